"""Where a speech request's first audio waits: the speech pipeline's backends wrapped so that each request's
first events are stamped (``time.perf_counter()``), for benchmarks/bench_omni_speech.py.

    marks = FirstEvents()
    backends = marks.wrap(backends, names)     # names: the thinker, talker and token2wav stages, in order
    ... run_pipeline(..., request_id=rid) ...
    marks.of(rid)  -> {"thinker_first_token": t, "talker_first_code": t, "first_window_codes": t,
                       "first_window_ready": t, "first_window_mel": t, "thinker_last_token": t, "talker_last_code": t}

``first_window_codes``: the talker's code that makes token2wav's first window computable was fed (its plan's
``codes_needed(0)``, or the utterance ended); ``first_window_ready`` / ``first_window_mel``: the token2wav
stage's own stamps of that window (``times`` of its first chunk: handed to the DiT engine, its mel done).
The pipeline's stage request ids are ``<request id>-<step>`` (omni_ray/runner_speech.py).
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator


def request_of(stage_request_id: str) -> str:
    return stage_request_id.rsplit("-", 1)[0]


class FirstEvents:
    def __init__(self):
        self.marks: dict[str, dict[str, float]] = {}
        self.chunks: dict[str, list[tuple]] = {}     # request -> (chunk, ready, mel, out) per token2wav window

    def mark(self, stage_request_id: str, key: str, t: float | None = None) -> None:
        self.marks.setdefault(request_of(stage_request_id), {}).setdefault(key, time.perf_counter() if t is None
                                                                           else t)

    def last(self, stage_request_id: str, key: str) -> None:
        """``key`` stamped now, over any earlier stamp (the last event of its kind)."""
        self.marks.setdefault(request_of(stage_request_id), {})[key] = time.perf_counter()

    def of(self, request_id: str) -> dict[str, float]:
        return self.marks.get(request_id, {})

    def wrap(self, backends: dict[str, Any], names: list[str]) -> dict[str, Any]:
        thinker, talker, t2w = names
        return backends | {thinker: _Thinker(backends[thinker], self), talker: _Talker(backends[talker], self),
                           t2w: _Token2Wav(backends[t2w], self)}


class _Timed:
    def __init__(self, inner, marks: FirstEvents):
        self.inner, self.marks = inner, marks

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _Thinker(_Timed):
    async def generate(self, req) -> AsyncIterator[dict]:
        async for d in self.inner.generate(req):
            if d.get("token_ids"):
                self.marks.mark(req.request_id, "thinker_first_token")
                self.marks.last(req.request_id, "thinker_last_token")
            yield d


class _Talker(_Timed):
    async def generate(self, req) -> AsyncIterator[dict]:
        async for d in self.inner.generate(req):
            if d.get("codes"):
                self.marks.mark(req.request_id, "talker_first_code")
                self.marks.last(req.request_id, "talker_last_code")
            yield d


class _Token2Wav(_Timed):
    """Counts the codes fed per request against the stage's plan (``stage.plan``: its ChunkPlan)."""

    def __init__(self, inner, marks: FirstEvents):
        super().__init__(inner, marks)
        self.fed: dict[str, int] = {}

    async def feed(self, request_id: str, codes, finished: bool) -> None:
        await self.inner.feed(request_id, codes, finished)
        n = self.fed[request_id] = self.fed.get(request_id, 0) + len(codes)
        if finished or n >= self.inner.stage.plan.codes_needed(0):
            self.marks.mark(request_id, "first_window_codes")
        if finished:
            del self.fed[request_id]

    async def generate(self, req) -> AsyncIterator[dict]:
        async for d in self.inner.generate(req):
            if "times" in d:
                tm = d["times"]
                self.marks.chunks.setdefault(request_of(req.request_id), []).append(
                    (d.get("chunk"), tm["ready"], tm["mel"], time.perf_counter()))
                if d.get("chunk") == 0:
                    self.marks.mark(req.request_id, "first_window_ready", tm["ready"])
                    self.marks.mark(req.request_id, "first_window_mel", tm["mel"])
            yield d


def smooth_start(pieces: list[tuple[float, float]]) -> float:
    """The earliest time a player can start the pieces ``(arrival time, seconds of audio)`` and play them to the
    end without waiting: each piece must have arrived by the time the ones before it have played."""
    start, played = pieces[0][0], 0.0
    for at, dur in pieces:
        start = max(start, at - played)
        played += dur
    return start


def playback_stall(first: float, pieces: list[tuple[float, float]]) -> float:
    """Seconds a player that starts at the first audio and plays the pieces ``(arrival time, seconds of
    audio)`` in order waits for pieces that are not there yet."""
    clock, stall = first, 0.0
    for at, dur in pieces:
        start = max(clock, at)
        stall += start - clock
        clock = start + dur
    return stall
