"""The pipelines of an ``OmniConfig`` in one process, without Ray (notebooks, tests, scripts):
``OmniLLM`` (blocking) and ``AsyncOmniLLM`` (asyncio), over the same step runner as the Serve app
(``omni_ray/runner.py``); each stage is its ``StageEngine`` adapter (``omni_ray/stages/``) in this
process. They also take vLLM-omni's list of stage configs (``omni_ray/vllm_omni_api.py``).

    llm = OmniLLM("serve_config.yaml")
    out = llm.generate("text2image", "a red fox", num_inference_steps=4, size="64x64")
    out.text, out.images[0].save("fox.png")
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import torch

from omni_ray.config import ARStageConfig, EncoderStageConfig, OmniConfig, load_app_config
from omni_ray.errors import EngineError, InvalidRequestError, ModelNotFoundError
from omni_ray.graphs import architecture_of, expand_pipelines
from omni_ray.heap import freeze_startup_heap
from omni_ray.media.images import load_image
from omni_ray.rules import check_text
from omni_ray.runner import StageArgs, check_image, run_pipeline
from omni_ray.stages.requests import ARRequest, DiTRequest, Handoff, ImageInput
from omni_ray.vllm_omni_api import (
    DEFAULT_PIPELINE,
    request_from_stage_args,
    stage_defaults,
    stage_outputs,
    stages_to_config,
)

log = logging.getLogger(__name__)


class _LocalAR:
    """An AR stage in this process: hidden states hand off by value."""

    def __init__(self, stage):
        self.stage = stage

    async def generate(self, req: ARRequest) -> AsyncIterator[dict]:
        """The stage's deltas; hidden-state rows (``return_hidden_states``) as a Handoff by value, as online
        (where it holds their object-store reference)."""
        async with contextlib.aclosing(self.stage.generate(_by_value(req))) as deltas:     # closed with us: aborts
            async for d in deltas:
                hs = d.get("hidden_states")
                if hs is not None:
                    d["hidden_states"] = Handoff(shape=list(hs.shape), tensor=hs,
                                                 dtype=str(hs.dtype).replace("torch.", ""))
                yield d

    def abort(self, request_id: str) -> None:
        self.stage.abort(request_id)

    async def thinker_prompt(self, req: ARRequest) -> tuple[list[int], torch.Tensor | None, int]:
        """(prompt token ids, M-RoPE positions [3, L] or None, rope delta) of a thinker request, as its stage
        processes it."""
        from omni_ray.ar.multimodal import MultiModalInputs

        prompt = await self.stage.prompt(_by_value(req))
        if isinstance(prompt, MultiModalInputs):
            return list(prompt.token_ids), prompt.positions, prompt.rope_delta
        return list(prompt), None, 0

    async def thinker_states(self, req: ARRequest, fed: list[int]) -> tuple[list[int], Handoff, torch.Tensor | None,
                                                                            int]:
        """A thinker that does not stream its hidden states: its prompt and the tokens it fed itself (``fed``,
        all its generated tokens but the last) encoded in one pass -> (prompt ids, final hidden states
        [L + len(fed), E], M-RoPE positions, rope delta)."""
        from omni_ray.ar.multimodal import MultiModalInputs

        prompt = await self.stage.prompt(_by_value(req))
        if isinstance(prompt, MultiModalInputs):
            ids, pos, delta = list(prompt.token_ids), prompt.positions, prompt.rope_delta
            full = dataclasses.replace(prompt, token_ids=ids + list(fed))
        else:
            ids, pos, delta = list(prompt), None, 0
            full = ids + list(fed)
        hs = await self.stage.engine.encode(full, f"{req.request_id}-states")
        return ids, Handoff(shape=list(hs.shape), tensor=hs), pos, delta

    async def encode(self, req: ARRequest) -> Handoff:
        return (await self.encode_batch([req]))[0]

    async def encode_batch(self, reqs: list[ARRequest]) -> list[Handoff]:
        """Several requests added to the engine together (a prompt and its negative prompt: one step)."""
        hss = await self.stage.encode_batch([_by_value(r) for r in reqs])
        return [Handoff(shape=list(hs.shape), tensor=hs) for hs in hss]


def _by_value(req: ARRequest) -> ARRequest:
    """``req`` with an edit's ``ImageInput`` as the image itself (offline: no object store)."""
    mm = req.multi_modal_data
    if not mm or not any(isinstance(v, ImageInput) for v in mm.values()):
        return req
    return dataclasses.replace(req, multi_modal_data={k: v.image if isinstance(v, ImageInput) else v
                                                      for k, v in mm.items()})


class _LocalDiT:
    def __init__(self, stage):
        self.stage = stage

    def generate(self, req: DiTRequest) -> AsyncIterator[dict]:
        return self.stage.generate(req)

    def abort(self, request_id: str) -> None:
        self.stage.abort(request_id)


class _LocalSpeech(_LocalDiT):
    """A talker or token2wav stage in this process: ``feed`` and ``voices`` as the adapter has them."""

    async def feed(self, request_id: str, *args) -> None:
        await self.stage.feed(request_id, *args)

    @property
    def voices(self) -> list[str]:
        return self.stage.voices


@dataclass
class PipelineOutput:
    pipeline: str
    prompt: str | None                               # None: the request was chat messages
    text: str | None = None
    images: list | None = None                       # PIL images
    videos: list | None = None                       # video pipelines: uint8 frame arrays [F, H, W, 3]
    hidden_states: torch.Tensor | None = None        # [T, H] when the last step outputs hidden states
    audio: Any = None                                # speech (``audio={"voice": ...}``): float32 samples [n]
    sample_rate: int | None = None                   # ... at this rate (Hz)
    voice: str | None = None
    stages: list[dict] = field(default_factory=list)  # per step: stage, elapsed_s, ...
    usage: dict = field(default_factory=dict)


class _Stages:
    """The stage engines of an ``OmniConfig`` in this process, built on first use. The config is an
    ``OmniConfig`` (or its YAML / dict / Serve config file) or vLLM-omni's list of stage configs
    (``omni_ray.vllm_omni_api``), which builds one pipeline ``default`` through them."""

    def __init__(self, config):
        self._stage_list = None
        if isinstance(config, (list, tuple)):
            self._stage_list = sorted(config, key=lambda s: getattr(s, "stage_id", 0))
            config = stages_to_config(list(config))
        # an OmniConfig, its YAML/dict, or a Serve config file; graph pipelines as steps
        self.config = expand_pipelines(load_app_config(config))
        self._defaults = stage_defaults(self._stage_list) if self._stage_list else {}
        self._stages: dict[str, Any] = {}
        self._lock = threading.RLock()         # reentrant: an AR stage builds the encoder stage it uses

    # ------------------------------------------------------------------ engines
    def stage(self, name: str):
        """The stage's ``StageEngine`` adapter (built and started on first use)."""
        if name not in self.config.stages:
            raise ModelNotFoundError(f"unknown stage {name!r}; stages: {sorted(self.config.stages)}", param="stage")
        with self._lock:
            if name not in self._stages:
                cfg = self.config.stages[name]
                if isinstance(cfg, ARStageConfig) and cfg.engine.model.submodel == "talker":
                    from omni_ray.stages.talker import TalkerStageEngine
                    stage = TalkerStageEngine(cfg.engine_config(), self.config.app.limits)
                elif isinstance(cfg, ARStageConfig):
                    from omni_ray.stages.ar import ARStageEngine
                    eng = cfg.engine_config()         # offline: the engine in this process unless asked
                    if eng.core_process == "auto":
                        eng = eng.model_copy(update={"core_process": "off"})
                    encoder = self.stage(cfg.encoder).encode if cfg.encoder else None   # its encoder stage, here
                    stage = ARStageEngine(eng, self.config.app.limits, media=self.config.app.media, encoder=encoder)
                elif isinstance(cfg, EncoderStageConfig):
                    from omni_ray.stages.encoder import EncoderStageEngine
                    stage = EncoderStageEngine(cfg.engine)
                elif architecture_of(cfg.engine.model.path) == "Qwen2_5OmniForConditionalGeneration":
                    from omni_ray.stages.token2wav import Token2WavStageEngine
                    stage = Token2WavStageEngine(cfg.engine)
                else:
                    from omni_ray.stages.dit import DiTStageEngine
                    stage = DiTStageEngine(cfg.engine)
                stage.start()
                freeze_startup_heap()             # its modules: no full collection walks them mid-request
                self._stages[name] = stage
            return self._stages[name]

    def engine(self, stage: str):
        """The stage's engine itself (``AsyncLLM`` / ``AsyncDiTEngine``)."""
        return self.stage(stage).engine

    def _backend(self, stage: str):
        s = self.stage(stage)
        return _LocalAR(s) if s.kind == "ar" else _LocalSpeech(s) if s.kind in ("talker", "token2wav") else _LocalDiT(s)

    def _kinds(self) -> dict[str, str]:
        return {k: v.kind for k, v in self.config.stages.items()}

    def _stage_request(self, stage_args: list[dict], pipeline: str | None):
        """(pipeline config, backends, kinds, stage ids, prompt, StageArgs) of one request in
        vLLM-omni's form (a list of per-stage dicts)."""
        name = pipeline or (DEFAULT_PIPELINE if DEFAULT_PIPELINE in self.config.pipelines else None)
        if name is None and len(self.config.pipelines) == 1:
            name = next(iter(self.config.pipelines))
        if name not in self.config.pipelines:
            raise ModelNotFoundError(f"name the pipeline; pipelines: {sorted(self.config.pipelines)}",
                                     param="pipeline")
        prompt, args = request_from_stage_args(self.config, stage_args, self._defaults, name)
        pipe, kinds = self.config.pipelines[name], self._kinds()
        args.validate(name, pipe, kinds)
        ids = [s.stage_id for s in self._stage_list] if self._stage_list and name == DEFAULT_PIPELINE \
            else list(range(len(pipe.steps)))
        backends = {s.stage: self._backend(s.stage) for s in pipe.steps}
        return pipe, backends, kinds, ids, prompt, args

    def stats(self) -> dict:
        return {k: s.stats() for k, s in self._stages.items()}


class OmniLLM(_Stages):
    """The pipelines of an ``OmniConfig`` in one process, without Ray (notebooks, tests, scripts).

    Engines are built on first use; requests run on a private event loop thread, so a list of
    prompts is batched by the engines exactly as concurrent HTTP requests are.

        OmniLLM(cfg).generate("text2image", "a fox", max_tokens=16)      # a named pipeline
        OmniLLM([ar, dit]).generate([{"prompt": "a fox"}, {"num_inference_steps": 4}])   # vLLM-omni
    """

    def __init__(self, config: OmniConfig | str | Path | dict | list):
        super().__init__(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="omni-pipeline", daemon=True)
        self._thread.start()
        # shut the engines down on their loop when this object goes away or the interpreter exits
        # (as vLLM's LLM): no engine task is left pending for the loop's garbage collection to close
        self._finalizer = weakref.finalize(self, _shutdown_on_loop, self._loop, self._thread, self._stages,
                                           self._lock)
        self._finalizer.atexit = False
        _at_exit(self._finalizer)

    # ------------------------------------------------------------------ API
    def generate(self, pipeline: str | list[dict], prompt: str | list[str] | None = None, use_tqdm: bool = True,
                 image: Any = None, messages: list[dict] | list[list[dict]] | None = None, audio: dict | None = None,
                 **stage_args) -> PipelineOutput | list[PipelineOutput] | list:
        """Run ``pipeline`` on one prompt or a list (run concurrently, batched by the engines).
        ``stage_args``: SamplingParams / DiffusionParams fields (``size`` "WxH", ``n``,
        ``system_prompt``, ``layer``) and ``stage_args={stage: {...}}``. ``image``: the input image of
        a pipeline that edits one (``qwen-image-edit``): a PIL image, bytes, a data URL or base64,
        checked under ``app.media``; one for every prompt, or a list with one per prompt. ``messages``: chat
        messages (media content parts included) instead of ``prompt``: one conversation, or a list of them.
        ``audio={"voice": "Chelsie"}``: speech out of a speech pipeline (Qwen2.5-Omni): the outputs' ``audio``
        (float32 samples) and ``sample_rate``; without it such a pipeline answers with text only. vLLM-omni's form,
        ``generate(stage_args)`` with one dict per stage, returns one ``StageOutput`` per stage
        (``prompt`` may then name the pipeline)."""
        self._check_open()
        if isinstance(pipeline, (list, tuple)):
            return self._generate_stages(list(pipeline), prompt)
        if pipeline not in self.config.pipelines:
            raise ModelNotFoundError(f"unknown pipeline {pipeline!r}; pipelines: {sorted(self.config.pipelines)}",
                                     param="pipeline")
        if messages is not None:
            if prompt is not None:
                raise InvalidRequestError("give exactly one of prompt and messages", param="messages")
            if not isinstance(messages, list) or not messages:
                raise InvalidRequestError("messages must be a non-empty list of chat messages", param="messages")
            single = isinstance(messages[0], dict)
            convs = [messages] if single else list(messages)
            prompts = [None] * len(convs)
        else:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else list(prompt or [])
            convs = [None] * len(prompts)
            if not prompts:
                raise InvalidRequestError("prompt must be a non-empty string or a list of them", param="prompt")
            for p in prompts:
                check_text(p)
        args = StageArgs.from_kwargs(stage_args)
        pipe, kinds = self.config.pipelines[pipeline], self._kinds()
        args.validate(pipeline, pipe, kinds)
        images = self._images(pipeline, pipe, image, len(prompts))
        backends = {s.stage: self._backend(s.stage) for s in pipe.steps}
        outs = self._run(self._run_all(pipeline, pipe, backends, kinds, prompts, args, use_tqdm, images, convs,
                                       audio))
        return outs[0] if single else outs

    def _images(self, name: str, pipe, image: Any, n: int) -> list[ImageInput | None]:
        """One checked input image per prompt (None each for pipelines that take none)."""
        if isinstance(image, (list, tuple)):
            if len(image) != n:
                raise InvalidRequestError(f"got {len(image)} images for {n} prompts", param="image")
            return [self._images(name, pipe, im, 1)[0] for im in image]
        check_image(name, pipe, image)
        if image is None:
            return [None] * n
        return [ImageInput.of(load_image(image, "image", self.config.app.media))] * n

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise EngineError("this OmniLLM was shut down; create a new one")

    def _run(self, coro):
        """Run ``coro`` on the engines' loop and wait for its result."""
        try:
            self._check_open()
        except EngineError:
            coro.close()
            raise
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _run_all(self, name, pipe, backends, kinds, prompts, args, use_tqdm, images, convs=None,
                       audio=None) -> list[PipelineOutput]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=f"pipeline {name}", disable=not use_tqdm, dynamic_ncols=True)

        async def one(p: str | None, image: ImageInput | None, conv: list[dict] | None) -> PipelineOutput:
            out = PipelineOutput(pipeline=name, prompt=p)
            rid = f"offline-{uuid.uuid4().hex[:12]}"
            async for ev in run_pipeline(pipe, backends, kinds, p, rid, args, image, messages=conv, audio=audio):
                if ev["type"] == "result":
                    hs, sound = ev["hidden_states"], ev.get("audio") or {}
                    out = dataclasses.replace(out, text=ev["text"], images=ev["images"], videos=ev["videos"],
                                              stages=ev["stages"],
                                              usage=ev["usage"], hidden_states=hs.tensor if hs else None,
                                              audio=sound.get("samples"), sample_rate=sound.get("sample_rate"),
                                              voice=sound.get("voice"))
            bar.update(1)
            return out

        convs = convs or [None] * len(prompts)
        try:
            return list(await asyncio.gather(*(one(p, im, c) for p, im, c in zip(prompts, images, convs))))
        finally:
            bar.close()

    def _generate_stages(self, stage_args: list[dict], pipeline: str | None) -> list:
        pipe, backends, kinds, ids, prompt, args = self._stage_request(stage_args, pipeline)

        async def run() -> list:
            rid = f"offline-{uuid.uuid4().hex[:12]}"
            return [o async for o in stage_outputs(pipe, backends, kinds, ids, prompt, rid, args)]

        return self._run(run())

    def shutdown(self) -> None:
        """Stop every engine on its loop, then the loop (idempotent; also run at exit)."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _at_exit(fn) -> None:
    """Run ``fn`` when the interpreter exits, early enough that engines can still use thread pools:
    with threading's exit hooks (before concurrent.futures refuses new work), else with atexit."""
    register = getattr(threading, "_register_atexit", None)
    try:
        (register or atexit.register)(fn)
    except RuntimeError:                  # the interpreter is already shutting down
        atexit.register(fn)


def _shutdown_on_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, stages: dict,
                      lock: threading.Lock) -> None:
    """``OmniLLM``'s engines shut down on the loop they run on, then the loop stopped and closed."""
    async def stop():
        for name, s in list(stages.items()):
            try:
                await s.shutdown()
            except Exception as err:  # noqa: BLE001 - the other engines still shut down
                log.warning("stage %s did not shut down cleanly: %r", name, err)
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:                    # streams a caller left open: cancelled, not destroyed pending
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    if threading.current_thread() is thread:    # collected on its own loop: stop there, without waiting
        loop.create_task(stop()).add_done_callback(lambda _: loop.stop())
        return
    with lock:
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=60)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
        stages.clear()
        if not loop.is_running() and not loop.is_closed():
            loop.close()


class AsyncOmniLLM(_Stages):
    """vLLM-omni's online form: the engines on the caller's event loop; ``generate(stage_args)``
    is an async generator of ``StageOutput``s, each as its stage ends.

        llm = AsyncOmniLLM([create_ar_stage_config(0, "tiny:qwen3"), ...])
        async for out in llm.generate([{"prompt": "a fox", "max_tokens": 16}, {...}]):
            print(out.stage_id, out.final_output_type)
    """

    async def generate(self, stage_args: list[dict], request_id: str | None = None,
                       pipeline: str | None = None) -> AsyncIterator:
        pipe, backends, kinds, ids, prompt, args = self._stage_request(stage_args, pipeline)
        rid = request_id or f"async-{uuid.uuid4().hex[:12]}"
        async for out in stage_outputs(pipe, backends, kinds, ids, prompt, rid, args):
            yield out

    async def generate_async(self, stage_args: list[dict], request_id: str | None = None) -> list:
        """Every stage's output at once (the examples' ``await llm.generate_async(stage_args)``)."""
        return [o async for o in self.generate(stage_args, request_id)]

    async def shutdown(self) -> None:
        for s in self._stages.values():
            await s.shutdown()
        self._stages.clear()
