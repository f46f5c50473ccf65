"""The talker stage engine (Qwen2.5-Omni speech out): ``TalkerRequest``s over an ``AsyncLLM`` running the
checkpoint's talker (``model.submodel: talker``), fed the thinker's generated tokens as they come.

    stage = TalkerStageEngine(AREngineConfig(model=ModelConfig(path=omni_dir, submodel="talker"))); stage.start()
    async for d in stage.generate(TalkerRequest(rid, "Chelsie", params, prompt_ids, Handoff(prompt_hidden))):
        d == {"codes": [new codec ids], "finished": bool, "finish_reason": str | None, "num_codes": int}
    await stage.feed(rid, ThinkerRows(token_ids, Handoff(rows), finished))     # from another task, any time

The talker's input rows are the thinker's final hidden state plus its token embedding per position
(``TalkerInput``): the stage loads the thinker's embedding table (``thinker.model.embed_tokens.weight``)
from the same checkpoint, so only hidden states travel between stages. The talker request starts once the
thinker has fed its first generated token, then waits (sits out engine steps) whenever it is ahead of the
thinker. Feeds are buffered from the moment ``generate`` is entered (even just before); ``abort`` frees
them. The codec end / pad tokens end a request and are not yielded.

``kind = "talker"``: an AR engine whose requests are ``TalkerRequest``s, not ``ARRequest``s. Its engine
core runs in this process (a thread; ``core_process`` is off), since fed rows go straight into the
request's ``InputEmbeds``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

import torch

from omni_ray.ar.models.qwen2_5_omni_talker_inputs import TalkerInput
from omni_ray.config import AREngineConfig, LimitsConfig
from omni_ray.errors import ConfigError, InvalidRequestError, RequestCancelledError
from omni_ray.stages.protocol import EngineStage
from omni_ray.stages.requests import Handoff, TalkerRequest, ThinkerRows
from omni_ray.stages.voices import speaker_bos, speech_voices

EMBED_NAMES = ("thinker.model.embed_tokens.weight", "model.embed_tokens.weight")


def thinker_embedding(path) -> torch.Tensor:
    """The thinker's token embedding table [V, E] of a Qwen2.5-Omni checkpoint (one tensor read)."""
    from safetensors import safe_open

    from omni_ray.ar.models.loader import weight_files
    from omni_ray.testing import resolve_model

    for f in weight_files(resolve_model(path)):
        if f.suffix != ".safetensors":
            continue
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in EMBED_NAMES:
                if name in st.keys():
                    return st.get_tensor(name)
    raise ConfigError(f"{path}: no thinker embedding table ({EMBED_NAMES[0]}) in its safetensors")


async def handoff_tensor(h: Handoff) -> torch.Tensor:
    """A Handoff's rows as a float32 tensor: by value, or resolved here from the object store (``Handoff.resolve``:
    several references in order, cut to its span)."""
    return (await h.resolve()).float()


class _Feed:
    """One request's feeds, queued in order (``generate`` applies them)."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()


class TalkerStageEngine(EngineStage):
    kind = "talker"

    def __init__(self, config: AREngineConfig, limits: LimitsConfig | None = None, engine=None):
        if config.model.submodel != "talker":
            raise ConfigError("a talker stage runs model.submodel: talker (the Qwen2.5-Omni talker)")
        if config.core_process != "off":            # fed rows go into the request's InputEmbeds in this process
            config = config.model_copy(update={"core_process": "off"})
        self.config, self.limits = config, limits or LimitsConfig()
        self.engine = engine
        self._feeds: dict[str, _Feed] = {}
        self.table: torch.Tensor | None = None
        self.tokens = None
        self.media_ids: tuple[int, ...] = ()

    def start(self) -> None:
        if self.engine is None:
            from omni_ray.ar import AsyncLLM
            self.engine = AsyncLLM(self.config)
        if self.table is None:
            from omni_ray.ar.models.loader import read_hf_config
            from omni_ray.ar.models.mrope import MRopeSpec
            from omni_ray.testing import resolve_model

            arch = self.engine.engine.arch
            self.tokens = arch.talker
            self.table = thinker_embedding(self.config.model.path)
            spec = MRopeSpec.from_hf(read_hf_config(resolve_model(self.config.model.path)))
            self.media_ids = tuple(t for t in (spec.image_token_id, spec.video_token_id, spec.audio_token_id)
                                   if t is not None) if spec else ()

    @property
    def voices(self) -> list[str]:
        return speech_voices(self.config.model.path)

    def _feed(self, request_id: str) -> _Feed:
        f = self._feeds.get(request_id)
        if f is None:
            f = self._feeds[request_id] = _Feed()
        return f

    async def feed(self, request_id: str, rows: ThinkerRows) -> None:
        """The thinker's next generated tokens (and their hidden states) for ``request_id``; buffered in order."""
        if not isinstance(rows, ThinkerRows):
            raise InvalidRequestError(f"feed takes ThinkerRows, got {type(rows).__name__}", param="rows")
        self._feed(request_id).queue.put_nowait(rows)

    def abort(self, request_id: str) -> None:
        f = self._feeds.pop(request_id, None)
        if f is not None:
            f.queue.put_nowait(RequestCancelledError(f"request {request_id} was cancelled"))
        self.engine.abort(request_id)

    async def generate(self, req: TalkerRequest) -> AsyncIterator[dict]:
        feed = self._feed(req.request_id)
        pump = None
        try:
            bos = speaker_bos(self.config.model.path, req.voice)               # InvalidRequestError(param="voice")
            hidden = await handoff_tensor(req.prompt_hidden)
            inp = TalkerInput.from_thinker(self.tokens, self.table, req.prompt_ids, hidden, bos, self.media_ids,
                                           req.positions, req.rope_delta)
            while inp.embeds is None:                                            # until the thinker's first token
                if await self._apply(inp, await self._next(feed)):
                    if inp.embeds is None:                                       # it ended without a fed token
                        yield {"codes": [], "finished": True, "finish_reason": "stop", "num_codes": 0}
                        return
                    break
            done = inp.embeds.closed
            pump = None if done else asyncio.get_running_loop().create_task(self._pump(inp, feed, req.request_id))
            prompt = inp.prompt()
            stop = set(self.tokens.stop_ids)              # never yielded (no codes token2wav takes)
            ends = set() if req.params.ignore_eos else stop    # ignore_eos: a fixed length (benchmarks)
            params = dataclasses.replace(req.params, stop_token_ids=sorted(ends | set(req.params.stop_token_ids or [])),
                                         skip_special_tokens=False, structured_outputs=None)
            params = params.resolve_max_tokens(len(prompt["prompt_token_ids"]), self.engine.max_model_len,
                                               self.limits.max_tokens)
            num = 0
            async for out in self.engine.generate(prompt, params, req.request_id):
                if pump is not None and pump.done() and pump.exception() is not None:
                    raise pump.exception()                 # a bad feed: the engine request was aborted
                codes = [t for t in out.token_ids if t not in stop]
                num += len(codes)
                yield {"codes": codes, "finished": out.finished, "finish_reason": out.finish_reason, "num_codes": num}
        finally:
            if pump is not None:
                pump.cancel()
            if self._feeds.get(req.request_id) is feed:
                del self._feeds[req.request_id]

    @staticmethod
    async def _next(feed: _Feed) -> ThinkerRows:
        item = await feed.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def _apply(self, inp: TalkerInput, rows: ThinkerRows) -> bool:
        """Add one feed to the request's inputs; True once the thinker is done."""
        if rows.token_ids:
            inp.add_thinker_token(list(rows.token_ids), await handoff_tensor(rows.hidden))
        if rows.finished and inp.embeds is not None:
            inp.finish()
        return rows.finished

    async def _pump(self, inp: TalkerInput, feed: _Feed, request_id: str) -> None:
        """Feeds after the request started: straight into its streamed input rows. A bad feed aborts the
        engine request (which would otherwise wait for its next row) and is raised by ``generate``."""
        try:
            while not await self._apply(inp, await self._next(feed)):
                pass
        except asyncio.CancelledError:
            raise
        except BaseException:
            self.engine.abort(request_id)
            raise
