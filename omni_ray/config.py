"""The one configuration tree of omni-ray.

Everything (engines, caches, schedulers, stages, pipelines, the HTTP app) is described by
pydantic models below; ``OmniConfig`` is the root, loadable from YAML. Unknown keys are
rejected and errors name the bad field (``ConfigError: stages.llm.engine.max_num_seqs: ...``).
Constructors take these objects; nothing is read from globals.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from omni_ray.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


DType = Literal["auto", "float32", "float16", "bfloat16"]


# ----------------------------------------------------------------------------- models
class ModelConfig(Strict):
    """Where a model's weights live: an HF/diffusers directory, or ``tiny:<name>`` for a
    checkpoint omni-ray generates locally (random weights, real architecture)."""

    path: str = Field(description="HF-format directory, or tiny:<name> (see omni_ray.models)")
    name: str | None = Field(None, description="served model name (defaults to the path's last part)")
    dtype: DType = Field("auto", description="weights and activations dtype; auto = bf16 on CUDA, fp32 on CPU")
    trust_remote_code: bool = Field(False, description="never needed by omni-ray's own model code")
    allow_pickle: bool = Field(False, description="allow pickle-based weight files (.bin/.pt)")

    @property
    def served_name(self) -> str:
        return self.name or self.path.rstrip("/").split("/")[-1].split(":")[-1]


# ----------------------------------------------------------------------------- AR engine
class KVCacheConfig(Strict):
    block_size: int = Field(256, ge=1, description="tokens per KV block (kvcache_block_size)")
    num_blocks: int = Field(-1, description="-1: size from gpu_memory_utilization (num_kvcache_blocks)")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    cpu_kv_bytes: int = Field(256 << 20, ge=1 << 20, description="KV budget on CPU when num_blocks == -1")
    enable_prefix_caching: bool = True


class ARSchedulerConfig(Strict):
    max_num_batched_tokens: int = Field(16384, ge=1)
    max_num_seqs: int = Field(512, ge=1)
    max_model_len: int = Field(4096, ge=2)
    enable_chunked_prefill: bool = True


class ParallelConfig(Strict):
    tensor_parallel_size: int = Field(1, ge=1)
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    backend: Literal["auto", "nccl", "gloo"] = "auto"


class AREngineConfig(Strict):
    model: ModelConfig
    device: Literal["auto", "cuda", "cpu"] = "auto"
    enforce_eager: bool = False
    seed: int = 0
    cache: KVCacheConfig = KVCacheConfig()
    scheduler: ARSchedulerConfig = ARSchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()
    hidden_states_layer: int = Field(-1, description="default layer returned by hidden-state requests")

    @model_validator(mode="after")
    def _check(self):
        if self.scheduler.max_num_batched_tokens < self.cache.block_size and not self.scheduler.enable_chunked_prefill:
            raise ValueError("max_num_batched_tokens must be >= block_size without chunked prefill")
        return self

    @classmethod
    def from_kwargs(cls, model: str | ModelConfig, **kw: Any) -> "AREngineConfig":
        """Map nano-vllm style flat keywords onto the tree (``LLM(model, max_num_seqs=...)``)."""
        flat = {
            "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
            "max_num_seqs": ("scheduler", "max_num_seqs"),
            "max_model_len": ("scheduler", "max_model_len"),
            "enable_chunked_prefill": ("scheduler", "enable_chunked_prefill"),
            "gpu_memory_utilization": ("cache", "gpu_memory_utilization"),
            "kvcache_block_size": ("cache", "block_size"),
            "num_kvcache_blocks": ("cache", "num_blocks"),
            "enable_prefix_caching": ("cache", "enable_prefix_caching"),
            "tensor_parallel_size": ("parallel", "tensor_parallel_size"),
            "dtype": ("model", "dtype"),
            "trust_remote_code": ("model", "trust_remote_code"),
        }
        tree: dict[str, Any] = {"model": model.model_dump() if isinstance(model, ModelConfig) else {"path": str(model)}}
        for k, v in kw.items():
            if k in flat:
                sec, field = flat[k]
                tree.setdefault(sec, {})[field] = v
            else:
                tree[k] = v
        return validate(cls, tree)


# ----------------------------------------------------------------------------- DiT engine
class DiTParallelConfig(Strict):
    cfg_parallel: bool = Field(False, description="conditional/unconditional halves on two ranks")
    sequence_parallel_size: int = Field(1, ge=1, description="Ulysses all-to-all over heads")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    backend: Literal["auto", "nccl", "gloo"] = "auto"


class DiTEngineConfig(Strict):
    model: ModelConfig
    device: Literal["auto", "cuda", "cpu"] = "auto"
    max_batch_size: int = Field(16, ge=1, description="requests (before CFG doubling) per transformer forward")
    vae_batch_size: int = Field(8, ge=1)
    max_pixels: int = Field(1024 * 1024, ge=64, description="height*width limit per image")
    max_steps: int = Field(100, ge=1)
    max_images_per_prompt: int = Field(4, ge=1)
    compile: bool = Field(False, description="torch.compile the transformer")
    parallel: DiTParallelConfig = DiTParallelConfig()
    fuse_elementwise: bool = Field(True, description="on CUDA, torch.compile the blocks' small elementwise "
                                   "helpers (layer norm + modulation, gated residual) into fused kernels")
    cuda_graphs: bool = Field(True, description="on CUDA, capture runs of transformer blocks as CUDA graphs "
                              "(per row / caption-length bucket and resolution) and replay them")
    max_sequence_length: int | None = Field(
        None, ge=1, description="caption tokens per prompt (text-encoder truncation and prompt_embeds limit); "
        "None = the family's default (PixArt 300, LLM-conditioned PixArt 1024, SD3 256 T5 tokens)")


# ----------------------------------------------------------------------------- cluster services
class PriorityWeights(Strict):
    high: float = Field(4.0, gt=0)
    normal: float = Field(2.0, gt=0)
    low: float = Field(1.0, gt=0)


class OmniSchedulerConfig(Strict):
    enabled: bool = True
    policy: Literal["fifo", "priority"] = "priority"
    priority_weights: PriorityWeights = PriorityWeights()
    max_queue_size: int = Field(1024, ge=0, description="queued (not yet running) requests before 429")
    default_stage_capacity: int = Field(64, ge=1, description="concurrency per stage until replicas report")
    retry_after_s: float = Field(1.0, ge=0)
    # issue 6 (scheduler) additions
    detached: bool = Field(True, description="detached actor: outlives the replica that created it")
    flush_interval_s: float = Field(0.002, ge=0, description="longest a client keeps a report (stage "
                                    "done, finished) waiting to ride along with an admission")
    unavailable_wait_s: float = Field(2.0, ge=0, description="while the actor is down, admissions wait "
                                      "this long for it, then are admitted locally (fail open)")
    call_timeout_s: float = Field(5.0, gt=0, description="a client call to the actor fails after this")
    owner_timeout_s: float = Field(30.0, gt=0, description="requests of a client silent this long are dropped")
    stuck_after_s: float = Field(600.0, gt=0, description="a stage held this long is reported as stuck")
    history_size: int = Field(10000, ge=1, description="finished requests kept for lookups and metrics")


class DiTCacheConfig(Strict):
    enabled: bool = True
    strategy: Literal["lru", "lfu", "ttl"] = "lru"
    max_bytes: int = Field(1 << 30, ge=0)
    ttl_s: float = Field(3600.0, gt=0)
    cache_images: bool = True
    cache_conditioning: bool = True
    # issue 6 (dit cache) additions
    detached: bool = Field(True, description="detached actor: outlives the replica that created it")
    call_timeout_s: float = Field(5.0, gt=0, description="a client call slower than this counts as a miss")


# ----------------------------------------------------------------------------- serve
class AutoscalingConfig(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = None
    target_ongoing_requests: float = Field(32, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)


class DeploymentConfig(Strict):
    num_replicas: int | Literal["auto"] = 1
    max_ongoing_requests: int = Field(256, ge=1)
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    health_check_period_s: float = Field(10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per replica (ray_actor_options.resources), "
        "e.g. {ar_gpu: 1} to pin a stage to the KubeRay worker group that offers it")


class ARStageConfig(Strict):
    kind: Literal["ar"] = "ar"
    engine: AREngineConfig
    deployment: DeploymentConfig = DeploymentConfig()


class DiTStageConfig(Strict):
    kind: Literal["dit"] = "dit"
    engine: DiTEngineConfig
    deployment: DeploymentConfig = DeploymentConfig()


StageConfig = Annotated[Union[ARStageConfig, DiTStageConfig], Field(discriminator="kind")]


class PipelineStep(Strict):
    stage: str = Field(description="a key of `stages`")
    input: Literal["prompt", "text", "hidden_states"] = Field(
        "prompt", description="what this stage takes: the request's prompt, the previous stage's text, or its prompt hidden states")
    output: Literal["text", "hidden_states", "images"] = "text"
    system_prompt: str | None = Field(None, description="AR stages: a system message to wrap the input with")
    max_tokens: int | None = Field(None, ge=1, description="AR text stages: a default max_tokens")


class PipelineConfig(Strict):
    steps: list[PipelineStep] = Field(min_length=1)
    description: str = ""


class LimitsConfig(Strict):
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_prompt_tokens: int = Field(8192, ge=1)
    max_tokens: int = Field(4096, ge=1)
    max_n: int = Field(8, ge=1)
    max_image_pixels: int = Field(1024 * 1024, ge=64)
    max_steps: int = Field(100, ge=1)
    max_images: int = Field(4, ge=1)


class AppConfig(Strict):
    name: str = "omni"
    route_prefix: str = "/"
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; also OMNI_RAY_API_KEYS (comma-separated)")
    request_timeout_s: float = Field(600.0, gt=0)
    limits: LimitsConfig = LimitsConfig()
    ingress: DeploymentConfig = DeploymentConfig(num_replicas=1, max_ongoing_requests=1024)

    def resolved_api_keys(self) -> list[str]:
        env = [k.strip() for k in os.environ.get("OMNI_RAY_API_KEYS", "").split(",") if k.strip()]
        return list(self.api_keys) + env


class OmniConfig(Strict):
    """The root: an application of stages joined into pipelines."""

    app: AppConfig = AppConfig()
    stages: dict[str, StageConfig]
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict)
    scheduler: OmniSchedulerConfig = OmniSchedulerConfig()
    dit_cache: DiTCacheConfig = DiTCacheConfig()

    @model_validator(mode="after")
    def _check_pipelines(self):
        for pname, p in self.pipelines.items():
            for i, step in enumerate(p.steps):
                if step.stage not in self.stages:
                    raise ValueError(f"pipelines.{pname}.steps.{i}.stage: unknown stage {step.stage!r}")
                kind = self.stages[step.stage].kind
                if kind == "dit" and step.output != "images":
                    raise ValueError(f"pipelines.{pname}.steps.{i}.output: a DiT stage outputs images")
                if kind == "ar" and step.output == "images":
                    raise ValueError(f"pipelines.{pname}.steps.{i}.output: an AR stage cannot output images")
                if i == 0 and step.input != "prompt":
                    raise ValueError(f"pipelines.{pname}.steps.0.input: the first step takes the prompt")
                if i > 0 and step.input != p.steps[i - 1].output:
                    raise ValueError(f"pipelines.{pname}.steps.{i}.input: {step.input!r} does not match "
                                     f"the previous step's output {p.steps[i - 1].output!r}")
        return self


# ----------------------------------------------------------------------------- loading
def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{loc}: {e['msg']}")
    return "; ".join(lines)


def validate(cls: type[BaseModel], data: Any) -> Any:
    """``cls.model_validate(data)`` raising ``ConfigError`` that names the bad field."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {cls.__name__}: {_format(err)}") from None


def load_config(source: str | Path | dict, cls: type[BaseModel] = OmniConfig) -> Any:
    """Load a config from a YAML file path, a YAML string, or a dict."""
    if isinstance(source, dict):
        data = source
    else:
        text = str(source)
        p = Path(text)
        if "\n" not in text and p.suffix in (".yaml", ".yml", ".json"):
            if not p.exists():
                raise ConfigError(f"config file not found: {p}")
            text = p.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping at the top level")
    return validate(cls, data)
