"""Where a speech request's time goes inside one ``OmniLLM`` process, engine by engine: every AR engine step
(the thinker's and the talker's, each on its engine thread), every DiT engine step (token2wav's windows, on its
worker thread) and every vocoder batch, stamped with ``time.perf_counter()`` (host time: a step's span includes
its wait for the device), for ``bench_omni_speech.py --timeline``, and the host gap from one step's end to the
same engine's next start (``gap_p50_ms``: a thread waiting for the interpreter or for work grows there). With
``gpu_events`` (``--timeline-gpu``) each step also records a CUDA event pair on the calling thread's current
stream (the engine's own, with ``cuda_stream``): the device time from the step's first queued work to its last
(``gpu_*``). Those events may disturb what they measure: on an H100 (py-spy, 2026-12-07) the talker's thread
spent ~0.3 s of each 1.1 s request returning from the event record after its steps, and runs with them had the
talker's last code at 977-1,030 ms against 746-772 ms in the same command's runs before they existed (other
H100s, other days); so they are off unless asked for.

    with EngineTrace() as trace:
        ... run requests ...
    trace.summary(t0, t1)   # what ran between t0 and t1: per engine, step count, busy ms, step ms p50 / p90 / max;
                            # the DiT steps and vocoder batches one by one (start ms from t0, ms, items)

The engines' step methods are wrapped for the ``with`` block only (class attributes, restored on exit): a
benchmark's instrument, never on in serving.
"""

from __future__ import annotations

import threading
import time

import torch

from benchmarks.common import pct


def _who(loop) -> str:
    """An AR engine's role: its model's submodel (``talker``), else ``thinker``."""
    model = getattr(getattr(loop.engine, "config", None), "model", None)
    return getattr(model, "submodel", None) or "thinker"


def _tokens(loop) -> int:
    """Tokens an AR engine step made: each decode row ``k`` (a multi-step run), each prompt finished one."""
    seqs, decodes, _, k = getattr(loop.engine, "last_step", (0, 0, 0, 0))
    return decodes * max(k, 1) + (seqs - decodes)


class EngineTrace:
    def __init__(self, gpu_events: bool = False):
        self.gpu_events = gpu_events
        self.events: list[tuple] = []     # (engine, start, end, items, CUDA start / end events or None, tokens)
        self._lock = threading.Lock()
        self._saved: list[tuple[type, str, object]] = []

    def _wrap(self, cls: type, name: str, who, count, tokens=lambda obj: 0) -> None:
        inner = getattr(cls, name)
        events, lock = self.events, self._lock

        cuda = torch.cuda.is_available() and self.gpu_events

        def timed(obj, *args, **kwargs):
            marks = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
            if marks:
                marks[0].record()
            t = time.perf_counter()
            out = inner(obj, *args, **kwargs)
            end = time.perf_counter()
            if marks:
                marks[1].record()
            with lock:
                events.append((who(obj), t, end, count(out, args), marks, tokens(obj)))
            return out

        self._saved.append((cls, name, inner))
        setattr(cls, name, timed)

    def __enter__(self) -> EngineTrace:
        from omni_ray.ar.engine.engine_core import CoreLoop
        from omni_ray.dit.engine import DiTEngine
        from omni_ray.dit.vocoder_batch import VocoderBatcher

        self._wrap(CoreLoop, "step", _who, lambda out, args: len(out), _tokens)
        self._wrap(DiTEngine, "step", lambda eng: "dit", lambda out, args: len(out))
        self._wrap(VocoderBatcher, "_decode_all", lambda v: "vocoder", lambda out, args: len(args[0]))
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, inner in reversed(self._saved):
            setattr(cls, name, inner)
        self._saved.clear()

    def summary(self, t0: float, t1: float) -> dict:
        with self._lock:
            events = [e for e in self.events if t0 <= e[1] <= t1]
        if any(e[4] for e in events):
            torch.cuda.synchronize()
        engines: dict[str, dict] = {}
        for who in sorted({e[0] for e in events}):
            mine = sorted((e for e in events if e[0] == who), key=lambda e: e[1])
            spans = sorted(1e3 * (e[2] - e[1]) for e in mine)
            engines[who] = dict(steps=len(spans), busy_ms=sum(spans), first_ms=1e3 * (mine[0][1] - t0),
                                last_end_ms=1e3 * (max(e[2] for e in mine) - t0),
                                p50_ms=pct(spans, 50), p90_ms=pct(spans, 90), max_ms=spans[-1],
                                gap_p50_ms=pct(gaps, 50) if (gaps := [1e3 * (b[1] - a[2])
                                                                      for a, b in zip(mine, mine[1:])]) else None)
            if mine[0][4]:
                gpu = [e[4][0].elapsed_time(e[4][1]) for e in mine]
                engines[who] |= dict(gpu_busy_ms=sum(gpu), gpu_p50_ms=pct(gpu, 50), gpu_p90_ms=pct(gpu, 90))
        spans = [dict(engine=e[0], start_ms=1e3 * (e[1] - t0), ms=1e3 * (e[2] - e[1]), items=e[3])
                 for e in sorted(events, key=lambda e: e[1]) if e[0] in ("dit", "vocoder")]
        return dict(engines=engines, dit_and_vocoder=spans, talker_after_thinker=self._talker_alone(events, t0))

    @staticmethod
    def _talker_alone(events: list[tuple], t0: float) -> dict | None:
        """The talker's steps that started after the thinker's last step ended (the thinker's decode no longer
        beside them; token2wav's windows still are): their count, tokens, span, busy and device time, host gaps;
        and split by whether a DiT step or vocoder batch overlapped the step: the step time per code of those with
        none beside them (``solo_ms_per_code``: the talker's own pace inside the pipeline) and of the others."""
        thinker = [e for e in events if e[0] == "thinker"]
        if not thinker:
            return None
        end = max(e[2] for e in thinker)
        mine = sorted((e for e in events if e[0] == "talker" and e[1] >= end), key=lambda e: e[1])
        if not mine:
            return None
        span = 1e3 * (mine[-1][2] - mine[0][1])
        codes = sum(e[5] for e in mine)
        others = [(e[1], e[2]) for e in events if e[0] in ("dit", "vocoder")]
        solo = [e for e in mine if not any(a < e[2] and e[1] < b for a, b in others)]    # no window work beside

        def rate(steps: list[tuple]) -> float | None:              # step ms per code made
            n = sum(e[5] for e in steps)
            return 1e3 * sum(e[2] - e[1] for e in steps) / n if n else None
        return dict(steps=len(mine), codes=codes, span_ms=span, ms_per_code=span / codes if codes else None,
                    busy_ms=sum(1e3 * (e[2] - e[1]) for e in mine),
                    gpu_busy_ms=sum(e[4][0].elapsed_time(e[4][1]) for e in mine) if mine[0][4] else None,
                    gap_ms=sum(1e3 * (b[1] - a[2]) for a, b in zip(mine, mine[1:])),
                    solo_steps=len(solo), solo_ms_per_code=rate(solo),
                    beside_ms_per_code=rate([e for e in mine if e not in solo]))
