"""vLLM-omni's offline API over omni-ray's pipelines: a list of stage configs, per-stage args.

    ar = create_ar_stage_config(0, "tiny:qwen3", ["text"], ["text"])
    dit = create_dit_stage_config(1, "tiny:pixart", ["text"], ["image"])
    outs = OmniLLM([ar, dit]).generate([{"prompt": "a lighthouse", "max_tokens": 16},
                                        {"prompt": "a lighthouse", "num_inference_steps": 4}])
    outs[0].outputs[0].text, outs[1].images[0]

A list of stages builds the existing ``OmniConfig``: one stage per entry (named ``stage-<id>``
unless given a ``name``), in ``stage_id`` order, and one pipeline ``default`` through them; each
stage's input modality must be the previous stage's output (text, hidden_states) and the first
takes the prompt. What such a list cannot express raises ``ConfigError`` naming the field.
``stage_args`` holds one dict per stage: the first's ``prompt`` is the request's; a later
stage's ``prompt`` (vLLM-omni's examples repeat it) must be the same, since a later stage takes
its predecessor's output. Outputs are one ``StageOutput`` per stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

import torch
from pydantic import Field

from omni_ray.config import (
    AREngineConfig,
    ARStageConfig,
    DiTEngineConfig,
    DiTStageConfig,
    OmniConfig,
    PipelineStep,
    Strict,
    validate,
)
from omni_ray.errors import ConfigError, InvalidRequestError
from omni_ray.runner import StageArgs, run_pipeline

DEFAULT_PIPELINE = "default"
_MODALITIES = {"text": "text", "hidden_states": "hidden_states", "embeddings": "hidden_states",
               "image": "images", "images": "images"}
# vLLM-omni's DiTConfig fields that are request defaults here; the rest it cannot express
_DIT_DEFAULTS = ("num_inference_steps", "guidance_scale", "height", "width")
_DIT_IGNORED = {"model_type": "dit", "use_diffusers": False}     # fields whose only value is ours


class OmniStageConfig(Strict):
    """One stage of vLLM-omni's stage list, holding the omni-ray stage config it builds."""

    stage_id: int = Field(ge=0)
    engine_type: Literal["AR", "DiT"]
    model_path: str
    input_modalities: list[str]
    output_modalities: list[str]
    name: str | None = None
    stage: ARStageConfig | DiTStageConfig
    step: dict = Field(default_factory=dict)           # extra PipelineStep fields (system_prompt, max_tokens)
    default_args: dict = Field(default_factory=dict)   # request defaults of this stage (from dit_config)

    @property
    def key(self) -> str:
        return self.name or f"stage-{self.stage_id}"


def _one(values: list[str] | None, default: str, field_name: str) -> str:
    values = list(values) if values else [default]
    if len(values) != 1 or values[0] not in _MODALITIES:
        raise ConfigError(f"{field_name}: omni-ray stages take and give one of {sorted(_MODALITIES)}, "
                          f"got {values}")
    return _MODALITIES[values[0]]


def create_ar_stage_config(stage_id: int, model_path: str, input_modalities: list[str] | None = None,
                           output_modalities: list[str] | None = None, *, name: str | None = None,
                           system_prompt: str | None = None, max_tokens: int | None = None,
                           vllm_config: Any = None, **engine_kwargs) -> OmniStageConfig:
    """An AR stage: text in, text (or prompt hidden states) out. ``engine_kwargs`` are ``LLM``'s
    (nano-vllm / vLLM flat names: ``max_model_len``, ``enforce_eager``, ...)."""
    if vllm_config is not None:
        raise ConfigError("vllm_config: omni-ray has its own engine; pass its keywords instead "
                          "(max_model_len=..., enforce_eager=...)")
    if _one(input_modalities, "text", "input_modalities") != "text":
        raise ConfigError("input_modalities: an AR stage takes text")
    out = _one(output_modalities, "text", "output_modalities")
    if out == "images":
        raise ConfigError("output_modalities: an AR stage gives text or hidden_states, not images")
    engine = AREngineConfig.from_kwargs(model_path, **engine_kwargs)
    step = {k: v for k, v in (("system_prompt", system_prompt), ("max_tokens", max_tokens)) if v is not None}
    return validate(OmniStageConfig, dict(
        stage_id=stage_id, engine_type="AR", model_path=model_path, input_modalities=input_modalities or ["text"],
        output_modalities=output_modalities or ["text"], name=name, stage=ARStageConfig(engine=engine), step=step))


def create_dit_stage_config(stage_id: int, model_path: str, input_modalities: list[str] | None = None,
                            output_modalities: list[str] | None = None, dit_config: Any = None, *,
                            name: str | None = None, **engine_kwargs) -> OmniStageConfig:
    """A DiT stage: text (a prompt) or an AR stage's hidden states in, images out.
    ``dit_config`` (vLLM-omni's DiTConfig, or a dict of its fields): ``num_inference_steps``,
    ``guidance_scale``, ``height``, ``width`` become this stage's request defaults, ``batch_size``
    its ``max_batch_size``; ``engine_kwargs`` are ``DiTEngineConfig`` fields."""
    inp = _one(input_modalities, "text", "input_modalities")
    if _one(output_modalities, "image", "output_modalities") != "images":
        raise ConfigError("output_modalities: a DiT stage gives images")
    if inp == "images":
        raise ConfigError("input_modalities: a DiT stage takes text or hidden_states, not images")
    defaults: dict = {}
    if dit_config is not None:
        dc = dit_config if isinstance(dit_config, dict) else {
            k: v for k, v in vars(dit_config).items() if not k.startswith("_")}
        for k, v in dc.items():
            if v is None:
                continue
            if k in _DIT_DEFAULTS:
                defaults[k] = v
            elif k == "batch_size":
                engine_kwargs.setdefault("max_batch_size", v)
            elif k in _DIT_IGNORED and v == _DIT_IGNORED[k]:
                continue
            else:
                raise ConfigError(f"dit_config.{k}: omni-ray takes the scheduler and pipeline from the "
                                  f"checkpoint (model_index.json); {k}={v!r} cannot be set")
    engine = validate(DiTEngineConfig, {"model": {"path": model_path}, **engine_kwargs})
    return validate(OmniStageConfig, dict(
        stage_id=stage_id, engine_type="DiT", model_path=model_path, input_modalities=input_modalities or ["text"],
        output_modalities=output_modalities or ["image"], name=name, stage=DiTStageConfig(engine=engine),
        default_args=defaults))


def stages_to_config(stages: list[OmniStageConfig], base: dict | None = None) -> OmniConfig:
    """The ``OmniConfig`` of a stage list: its stages and one pipeline ``default`` through them."""
    if not stages or not all(isinstance(s, OmniStageConfig) for s in stages):
        raise ConfigError("stages: a non-empty list of create_ar_stage_config / create_dit_stage_config results")
    ordered = sorted(stages, key=lambda s: s.stage_id)
    ids = [s.stage_id for s in ordered]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"stage_id: each stage needs its own id, got {ids}")
    keys = [s.key for s in ordered]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"name: each stage needs its own name, got {keys}")
    steps, prev = [], None
    for i, s in enumerate(ordered):
        inp = _one(s.input_modalities, "text", f"stages[{i}].input_modalities")
        out = _one(s.output_modalities, "text", f"stages[{i}].output_modalities")
        if prev is None and inp != "text":
            raise ConfigError(f"stages[{i}].input_modalities: the first stage takes the text prompt, not {inp}")
        if prev is not None and inp != prev:
            raise ConfigError(f"stages[{i}].input_modalities: {s.input_modalities} does not match the previous "
                              f"stage's output_modalities {ordered[i - 1].output_modalities}")
        steps.append(PipelineStep(stage=s.key, input="prompt" if prev is None else inp, output=out, **s.step))
        prev = out
    tree = dict(base or {}) | {"stages": {s.key: s.stage for s in ordered},
                               "pipelines": {DEFAULT_PIPELINE: {"steps": steps, "description": "the stage list"}}}
    return validate(OmniConfig, tree)


def stage_defaults(stages: list[OmniStageConfig]) -> dict[str, dict]:
    return {s.key: dict(s.default_args) for s in stages if s.default_args}


# ----------------------------------------------------------------------------- requests and outputs
def request_from_stage_args(config: OmniConfig, stage_args: list[dict], defaults: dict[str, dict] | None = None,
                            pipeline: str = DEFAULT_PIPELINE):
    """(prompt, StageArgs) of one request given as vLLM-omni's list of per-stage dicts."""
    from omni_ray.ar.sampling_params import SamplingParams

    steps = config.pipelines[pipeline].steps
    if not isinstance(stage_args, (list, tuple)) or not all(isinstance(d, dict) for d in stage_args):
        raise InvalidRequestError("stage_args must be a list of dicts, one per stage", param="stage_args")
    if len(stage_args) != len(steps):
        raise InvalidRequestError(f"stage_args has {len(stage_args)} entries; the pipeline has {len(steps)} "
                                  "stages", param="stage_args")
    prompt = stage_args[0].get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequestError("stage_args[0].prompt must be a non-empty string", param="stage_args[0].prompt")
    per_stage: dict[str, dict] = {}
    for i, (step, raw) in enumerate(zip(steps, stage_args)):
        raw = dict(raw)
        p = raw.pop("prompt", prompt)
        if p != prompt:
            raise InvalidRequestError(f"stage_args[{i}].prompt: stage {i} takes stage {i - 1}'s output; only "
                                      "the first stage's prompt can be set", param=f"stage_args[{i}].prompt")
        kind = config.stages[step.stage].kind
        try:
            split = StageArgs.from_kwargs(raw)
        except InvalidRequestError as err:
            raise InvalidRequestError(f"stage_args[{i}]: {err.message}",
                                      param=f"stage_args[{i}]" + (f".{err.param}" if err.param else "")) from None
        mine, other = (split.text, split.image) if kind == "ar" else (split.image, split.text)
        wrong = sorted(set(other) - set(mine))
        if wrong:
            what = "an AR" if kind == "ar" else "a DiT"
            raise InvalidRequestError(f"stage_args[{i}].{wrong[0]}: not an argument of {what} stage",
                                      param=f"stage_args[{i}].{wrong[0]}")
        if kind == "ar" and step.output == "text" and step.max_tokens is None:
            mine.setdefault("max_tokens", SamplingParams().max_tokens)     # vLLM's offline default
        per_stage[step.stage] = (defaults or {}).get(step.stage, {}) | mine
    return prompt, StageArgs(per_stage=per_stage)


@dataclass
class CompletionOutput:
    """One generated text of an AR stage (vLLM's ``CompletionOutput`` fields)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class StageOutput:
    """What one stage of a request gave (vLLM-omni's per-stage output). AR text stages fill
    ``text`` and ``outputs`` (vLLM's ``RequestOutput.outputs``); hidden-state stages
    ``hidden_states``; DiT stages ``images`` (PIL)."""

    stage_id: int
    stage: str
    final_output_type: str                     # "text" | "hidden_states" | "images"
    request_id: str
    prompt: str
    text: str | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    hidden_states: torch.Tensor | None = None
    images: list | None = None
    elapsed_s: float = 0.0
    finished: bool = True


class _Recorder:
    """A stage backend that keeps what each of its calls gave (token ids, hidden states, images),
    for the per-stage outputs; ``run_pipeline``'s events carry only text deltas and timings."""

    def __init__(self, backend):
        self.backend, self.seen = backend, {}

    async def generate(self, req) -> AsyncIterator[dict]:
        rec = self.seen.setdefault(req.request_id, {"token_ids": []})
        async for out in self.backend.generate(req):
            if "token_ids" in out:
                rec["token_ids"].extend(out["token_ids"])
                rec["finish_reason"] = out.get("finish_reason")
            elif out.get("kind") == "done":
                rec["images"] = out["images"]
            yield out

    async def encode(self, req):
        handoff = await self.backend.encode(req)
        self.seen[req.request_id] = {"hidden": handoff}
        return handoff


async def stage_outputs(pipe, backends: dict, kinds: dict, stage_ids: list[int], prompt: str, request_id: str,
                        args) -> AsyncIterator[StageOutput]:
    """Run ``pipe`` (the same ``run_pipeline`` as every other path) and yield each stage's
    ``StageOutput`` as the stage ends."""

    recorders = {k: _Recorder(b) for k, b in backends.items()}
    texts: dict[int, list[str]] = {}
    async for ev in run_pipeline(pipe, recorders, kinds, prompt, request_id, args):
        if ev["type"] == "text":
            texts.setdefault(ev["step"], []).append(ev["delta"])
        elif ev["type"] == "stage_end":
            i, stage = ev["step"], ev["stage"]
            rec = recorders[stage].seen.get(f"{request_id}-{i}", {})
            out = StageOutput(stage_ids[i], stage, ev["output"], request_id, prompt, elapsed_s=ev["elapsed_s"])
            if ev["output"] == "text":
                out.text = "".join(texts.get(i, []))
                out.outputs = [CompletionOutput(0, out.text, rec.get("token_ids", []), rec.get("finish_reason"))]
            elif ev["output"] == "hidden_states":
                out.hidden_states = rec["hidden"].tensor if rec.get("hidden") else None
            else:
                out.images = rec.get("images")
            yield out
