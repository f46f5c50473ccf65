"""The token2wav stage engine (Qwen2.5-Omni speech out): ``SpeechRequest``s over an ``AsyncDiTEngine``
running the checkpoint's token2wav, fed the talker's codec tokens as they come, synthesized chunk by chunk
(``SpeechStream``: Qwen's streaming code2wav windows).

    stage = Token2WavStageEngine(DiTEngineConfig(model=ModelConfig(path=omni_dir))); stage.start()
    async for d in stage.generate(SpeechRequest(rid, "Chelsie", DiffusionParams(seed=0))):
        d == {"pcm": np.ndarray float32 [n] in [-1, 1], "sample_rate": 24000, "finished": bool,
              "chunk": i, "times": {"ready": t, "mel": t}}   # when its window became computable, its mel done
    await stage.feed(rid, codes, finished)       # from another task, any time after generate was entered

Each window that becomes computable is one speech request of the engine (``<rid>-w<i>``, mel out) started at
once (with ``token2wav_hold_s``, a window after the first waits until the audio sent so far would play out within
that many seconds, or until all codes are in), so the windows of all streams (and several of one stream, when
codes come faster than synthesis or were held) share forwards; its mel is vocoded between engine steps (the
windows of all streams that finish together in one vocoder batch per length: ``VocoderBatcher``) and yielded
in chunk order. ``seed`` draws the stream's noise as the reference draws its initial state (``randn`` after
``manual_seed(seed)``). An utterance with no codes yields one empty, finished chunk. The chunks are the config's
``token2wav_stream`` plan (None: the reference's; omni_ray/dit/token2wav_chunks.py); ``times`` are
``time.perf_counter()`` values of this process (where the first audio's latency goes: bench_omni_speech.py).

``kind = "token2wav"``: a DiT engine whose requests are ``SpeechRequest``s.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from typing import AsyncIterator

import numpy as np

from omni_ray.config import DiTEngineConfig
from omni_ray.dit.params import DiffusionParams
from omni_ray.errors import ConfigError, InvalidRequestError, RequestCancelledError
from omni_ray.stages.protocol import EngineStage
from omni_ray.stages.requests import SpeechRequest


class Token2WavStageEngine(EngineStage):
    kind = "token2wav"

    def __init__(self, config: DiTEngineConfig, engine=None):
        self.config = config
        self.engine = engine
        self._feeds: dict[str, asyncio.Queue] = {}
        self._windows: dict[str, set[str]] = {}       # request id -> its windows' engine request ids in flight
        self._vocoder = None                          # VocoderBatcher: the streams' windows vocoded together
        self.plan = None                              # ChunkPlan: the config's token2wav_stream (start())
        self.clock = time.perf_counter                # when windows become computable, are due, audio goes out

    def start(self) -> None:
        if self.engine is None:
            from omni_ray.dit.async_engine import AsyncDiTEngine
            self.engine = AsyncDiTEngine(self.config)
        if not getattr(self.family, "produces_audio", False):
            raise ConfigError(f"{self.config.model.path}: not a speech model (no token2wav)")
        from omni_ray.dit.token2wav_chunks import ChunkPlan
        self.plan = ChunkPlan.for_family(self.family, self.config.token2wav_stream)     # ConfigError
        vocoder = getattr(self.family, "vocoder_graphs", None)
        if vocoder is not None:
            # every vocoder length the plan's chunks take, as CUDA graphs now (no-op on the CPU): the recurring ones
            # first (the first stream's first audio replays one), then a last chunk's (none captured while serving)
            # (on the engine's worker thread, like every capture: on its own stream, cuda_stream_sms's SMs)
            self.engine.run_on_worker(vocoder.warmup, self.plan.vocoder_lengths() + self.plan.last_vocoder_lengths())
        ode = getattr(self.engine.engine.runner.graphs, "ode", None)
        if ode is not None:                              # every whole-ODE shape the plan's windows can take, now
            self.engine.run_on_worker(ode.warmup, self.engine.engine,
                                      self.plan.longest_window(self.family.max_sequence_length))

    @property
    def family(self):
        return self.engine.engine.family

    @property
    def voices(self) -> list[str]:
        return self.family.voices

    @property
    def sample_rate(self) -> int:
        return self.family.sample_rate

    def _vocoder_batcher(self):
        if self._vocoder is None:
            from omni_ray.dit.vocoder_batch import VocoderBatcher
            self._vocoder = VocoderBatcher(self.engine, self.config.vae_batch_size)
        return self._vocoder

    def _queue(self, request_id: str) -> asyncio.Queue:
        q = self._feeds.get(request_id)
        if q is None:
            q = self._feeds[request_id] = asyncio.Queue()
        return q

    async def feed(self, request_id: str, codes: list[int], finished: bool) -> None:
        """The talker's next codec tokens for ``request_id`` (buffered in order); ``finished``: no more."""
        if not isinstance(finished, bool):
            raise InvalidRequestError("finished must be true or false", param="finished")
        codes = self.family.check_codes(codes) if len(codes) else []              # InvalidRequestError(param="codes")
        self._queue(request_id).put_nowait((codes, finished))

    def abort(self, request_id: str) -> None:
        q = self._feeds.pop(request_id, None)
        if q is not None:
            q.put_nowait(RequestCancelledError(f"request {request_id} was cancelled"))
        for wid in list(self._windows.get(request_id, ())):
            self.engine.abort(wid)

    async def generate(self, req: SpeechRequest) -> AsyncIterator[dict]:
        from omni_ray.dit.token2wav_chunks import SpeechStream

        rid, queue = req.request_id, self._queue(req.request_id)
        loop = asyncio.get_running_loop()
        pending: collections.deque = collections.deque()          # (window, task) in chunk order
        windows = self._windows.setdefault(rid, set())
        get: asyncio.Task | None = None
        try:
            p = req.params
            seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            stream = SpeechStream(self.family, req.voice, seed=seed, plan=self.plan)   # InvalidRequestError("voice")
            params = DiffusionParams(num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
                                     seed=seed)
            fed_all = False
            hold = self.config.token2wav_hold_s
            held: list = []                      # (window, when it became computable): not started yet
            played_from, audio_s = None, 0.0     # the first chunk's send time; seconds of audio sent

            def release(ws: list) -> None:            # in chunk order, all at once: one batched ODE
                for w, ready in ws:
                    wid = f"{rid}-w{w.index}"
                    windows.add(wid)
                    pending.append((w, ready, loop.create_task(self._mel(wid, w, params))))
                ws.clear()

            while True:
                if not fed_all and get is None:
                    get = loop.create_task(queue.get())
                waits = [t for t in (get, pending[0][2] if pending else None) if t is not None]
                due = None if not held or played_from is None else played_from + audio_s - hold
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED,
                                   timeout=None if due is None else max(0.0, due - self.clock()))
                if get is not None and get.done():
                    item, get = get.result(), None
                    if isinstance(item, BaseException):
                        raise item
                    codes, fed_all = item
                    try:
                        new = stream.push(codes, fed_all)
                    except ValueError as err:                   # past the model's longest utterance
                        raise InvalidRequestError(str(err), param="codes") from None
                    now = self.clock()
                    held += [(w, now) for w in new]
                    if held and (hold is None or fed_all or held[0][0].index == 0):     # the first is never held
                        release(held)
                    if fed_all and not new and stream.next_chunk == 0:       # no codes at all
                        yield {"pcm": np.zeros(0, np.float32), "sample_rate": self.sample_rate, "finished": True}
                        return
                if held and due is not None and self.clock() >= due:
                    release(held)
                while pending and pending[0][2].done():
                    w, ready, task = pending.popleft()
                    windows.discard(f"{rid}-w{w.index}")
                    mel, mel_at = task.result()
                    audio = await self._vocoder_batcher().decode(stream.vocoder_input(w, mel))
                    pcm = stream.trim(w, audio)
                    yield {"pcm": pcm, "sample_rate": self.sample_rate, "finished": w.last, "chunk": w.index,
                           "times": {"ready": ready, "mel": mel_at}}
                    played_from = self.clock() if played_from is None else played_from
                    audio_s += len(pcm) / self.sample_rate
                    if w.last:
                        return
        finally:
            if get is not None:
                get.cancel()
            for *_, task in pending:
                task.cancel()
            for wid in windows:
                self.engine.abort(wid)
            self._windows.pop(rid, None)
            if self._feeds.get(rid) is queue:
                del self._feeds[rid]

    async def _mel(self, wid: str, window, params: DiffusionParams):
        ev = None
        async for ev in self.engine.generate(None, params, wid, speech=window.speech, output_type="latent"):
            pass
        return ev.images[0], self.clock()
