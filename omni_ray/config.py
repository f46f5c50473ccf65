"""The one configuration tree of omni-ray.

Everything (engines, caches, schedulers, stages, pipelines, the HTTP app) is described by
pydantic models below; ``OmniConfig`` is the root, loadable from YAML. Unknown keys are
rejected and errors name the bad field (``ConfigError: stages.llm.engine.max_num_seqs: ...``).
Constructors take these objects; nothing is read from globals.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

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

    path: str = Field(description="HF-format directory, or tiny:<name> (see omni_ray.testing)")
    name: str | None = Field(None, description="served model name (defaults to the path's last part)")
    dtype: DType = Field("auto", description="weights and activations dtype; auto = bf16 on CUDA, fp32 on CPU")
    trust_remote_code: bool = Field(False, description=(
        "accepted for vLLM-style kwargs, must stay false: omni-ray never runs code shipped with a checkpoint "
        "(its model code is its own; tokenizers load without remote code)"))
    allow_pickle: bool = Field(False, description="allow pickle-based weight files (.bin/.pt)")
    submodel: Literal["talker"] | None = Field(None, description=(
        "which model of a multi-model checkpoint an AR engine runs: talker = the Qwen2.5-Omni talker "
        "(thinker states -> speech codec tokens); default: the language model (the Omni thinker)"))

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, v: bool) -> bool:
        if v:
            raise ValueError("omni-ray never runs code shipped with a checkpoint; trust_remote_code must be false")
        return v

    @property
    def served_name(self) -> str:
        return self.name or self.path.rstrip("/").split("/")[-1].split(":")[-1]


# ----------------------------------------------------------------------------- AR engine
class KVCacheConfig(Strict):
    """The paged KV cache of an AR engine: block size, how many blocks, prefix caching."""

    block_size: int = Field(256, ge=1, description="tokens per KV block (kvcache_block_size)")
    num_blocks: int = Field(-1, description="-1: size from gpu_memory_utilization (num_kvcache_blocks)")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description=
        "fraction of GPU memory for weights, activations and KV blocks when num_blocks == -1")
    cpu_kv_bytes: int = Field(256 << 20, ge=1 << 20, description="KV budget on CPU when num_blocks == -1")
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of identical prompt prefixes")


class ARSchedulerConfig(Strict):
    """Continuous batching of an AR engine: per-step token budget, concurrent sequences, context length."""

    max_num_batched_tokens: int = Field(16384, ge=1, description="tokens (prefill + decode) per engine step")
    max_num_seqs: int = Field(512, ge=1, description="sequences in the running batch")
    max_model_len: int = Field(4096, ge=2, description="prompt + output tokens of one sequence")
    enable_chunked_prefill: bool = Field(True, description="split long prompts across steps, mixed with decodes")
    max_num_encoder_tokens: int = Field(8192, ge=1, description=(
        "multimodal models: media placeholder tokens whose encoder (vision / audio tower) runs in one step; a "
        "prefill chunk stops before media over this budget (an item larger than it runs alone)"))
    encoder_cache_tokens: int = Field(32768, ge=1, description=(
        "multimodal models: encoder output rows kept by content hash, so the same image or clip in another "
        "request (or the rest of a chunked prompt) is not encoded again"))


class RankGroupConfig(Strict):
    """How one replica's ranks are placed and talk (rank 0 in the replica, the rest Ray actors)."""

    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="placement group strategy of one replica's ranks")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description=
        "collectives: auto = nccl on CUDA, gloo on CPU")
    timeout_s: float = Field(60.0, gt=0, description="a collective between ranks that takes longer fails "
                             "the engine (EngineError); a dead worker is noticed sooner, by its actor")


class ParallelConfig(RankGroupConfig):
    """Tensor parallelism of an AR engine across Ray actors (one placement group per replica)."""

    tensor_parallel_size: int = Field(1, ge=1, description="ranks (GPUs) one replica's model is sharded over")


class StructuredOutputsConfig(Strict):
    """Constrained decoding (``response_format`` json_schema / json_object, regex, grammar, choice):
    xgrammar compiles each distinct constraint once, in threads, and masks the sampled rows."""

    any_whitespace: bool = Field(False, description=(
        "JSON output may put any whitespace between tokens (vLLM's default); false: the compact form "
        "with one space after ':' and ',' (a model cannot stall on whitespace)"))
    compile_threads: int = Field(2, ge=1, le=64, description=(
        "threads that compile grammars, off the engine loop (a request waits for its own, others run)"))
    fill_threads: int = Field(0, ge=0, le=64, description=(
        "threads that fill a step's token masks of the constrained rows (0: half the CPU cores)"))
    cache_size: int = Field(256, ge=1, description="compiled grammars kept (least recently used dropped)")


class AREngineConfig(Strict):
    """An AR (text) engine: model, device, KV cache, batching, parallelism."""

    model: ModelConfig
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available, else CPU")
    cuda_stream: bool = Field(False, description=
        "on CUDA, this engine's device work on a stream of its own instead of the process's default stream: where "
        "engines share a process (OmniLLM's speech stages), another engine's queued work (a decode run, a "
        "token2wav ODE replay) then never holds up this one's steps")
    cuda_stream_priority: Literal["normal", "high"] = Field("normal", description=
        "with cuda_stream: the stream's priority; high: the GPU schedules this engine's pending kernels ahead of "
        "normal streams' (a speech pipeline's talker, whose codes pace the audio, beside token2wav's window ODEs)")
    cuda_stream_sms: int | None = Field(None, ge=1, description=
        "with cuda_stream: the stream belongs to a CUDA green context of this many SMs, so this engine's kernels "
        "leave the rest of the GPU to other engines in the process (a speech pipeline's thinker and talker decode "
        "at nearly full memory bandwidth on most SMs while token2wav's small window kernels get the others)")
    cuda_stream_sms_side: Literal["first", "last"] = Field("first", description=
        "which SMs cuda_stream_sms counts: the GPU's first or its last; one process splits the SMs once per "
        "boundary, so engines taking the first N and the last (total - N) get disjoint groups")
    enforce_eager: bool = Field(False, description="no CUDA graphs and no torch.compile (debugging, CPU)")
    seed: int = Field(0, description="torch seed at engine start (per-request sampling seeds are separate)")
    cache: KVCacheConfig = KVCacheConfig()
    scheduler: ARSchedulerConfig = ARSchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()
    structured_outputs: StructuredOutputsConfig = StructuredOutputsConfig()
    hidden_states_layer: int = Field(-1, description="default layer returned by hidden-state requests")
    decode_steps: int = Field(4, ge=1, le=64, description=(
        "decode steps run back to back on the device per schedule, each feeding its token to the next "
        "(vLLM's num_scheduler_steps; sampled batches are sampled on the device between the forwards, "
        "under tensor parallelism by rank 0, which broadcasts them): the host's per-step work is paid once "
        "per run and overlaps the GPU; tokens are identical to single steps (seeded requests draw once "
        "per step from their own generator); streams get up to this many tokens per delta"))
    async_decode: bool = Field(True, description=(
        "multi-step decode runs of an unchanged batch are queued on the device one ahead: the "
        "next run starts before the host has read and applied this one's tokens, so that host work "
        "(appending tokens, finishes, the serving loop's outputs) overlaps the GPU (as vLLM's async "
        "scheduling); tokens are identical. A run is resumed only while nothing waits to join and every "
        "sequence has room for it (one rank only: off under tensor parallelism)"))
    warmup: bool = Field(True, description=(
        "CUDA: run a few throw-away requests at start-up (several prompt lengths and batch sizes, greedy "
        "and sampled) so that kernel compilation and autotuning happen before the first real burst"))
    small_gemv: Literal["auto", "on", "off"] = Field("auto", description=(
        "CUDA decode of <= 4 sequences: Triton GEMVs with the norm / activation before each projection "
        "fused in, instead of cuBLAS plus separate elementwise kernels; auto: timed both ways on this "
        "model's layers at start-up, the faster kept"))
    decode_merge: Literal["kernel", "launch"] = Field("launch", description=(
        "CUDA Triton decode attention split over the context (small batches): merge the splits in "
        "the decode kernel itself (the last split's program, one launch per layer) or in a second "
        "kernel launch (launch measured faster: docs/benchmarks.md)"))
    mixed_graph_tokens: int = Field(2048, ge=0, le=2048, description=(
        "CUDA: steps that carry prompt tokens (a prefill, or prompts joining running decodes) with at "
        "most this many tokens replay a CUDA graph captured for their token bucket (16, 32, ... this), "
        "instead of running eagerly, where the host's per-op cost bounds the step; 0: eager. Single-GPU "
        "Triton attention only"))
    elementwise: Literal["triton", "compile"] = Field("triton", description=(
        "CUDA: the row-wise ops between projections (RMS norm with the residual add, SiLU-and-mul): "
        "one Triton kernel each, or torch.compile'd functions. Eager steps (prefill, and decodes that "
        "share a step with a prefill) are bound by the host's per-op cost, where a compiled region's "
        "guards and wrappers cost more than a Triton launch"))
    step_log: str | None = Field(None, description=(
        "profiling: append one JSON line per engine step to this file (wall-clock start `t`, duration "
        "`dt`, sequences, decodes, tokens, forwards, requests `added` since the previous step, `gc` "
        "seconds of garbage collection in it), from whichever process steps the engine (offline LLM, "
        "AsyncLLM's core, a Serve replica's core); a Serve AR replica adds its batched calls' arrivals, "
        "its sends of new requests to the core and its event loop's late wake-ups (omni_ray/profiling.py); "
        "benchmarks/bench_serve.py reads it to split a burst's time into arrival at the engine and stepping"))
    core_send_thread: bool = Field(True, description=(
        "engine core process: a second thread pickles and sends each step's outputs while the next "
        "step runs, so the loop goes from step to step without waiting for the send; off: sent inline"))
    media_towers: bool = Field(True, description=(
        "multimodal models: load the vision / audio towers in this engine and run them on the media of its "
        "requests (inline); false: the towers run elsewhere (an encoder stage, `stages.<name>.encoder`) and "
        "every image / audio item reaches the engine with its embedding (an item without one is refused)"))
    core_process: Literal["auto", "on", "off"] = Field("auto", description=(
        "AsyncLLM (serving): step the engine in its own child process, so the serving event loop never "
        "shares a GIL with it (vLLM's EngineCore); auto: on with tensor_parallel_size 1 (on CPU "
        "too, where PyTorch's kernels run slower from a second thread of a process)"))

    @model_validator(mode="after")
    def _check(self):
        if self.scheduler.max_num_batched_tokens < self.cache.block_size and not self.scheduler.enable_chunked_prefill:
            raise ValueError("max_num_batched_tokens must be >= block_size without chunked prefill")
        if self.cuda_stream_priority != "normal" and not self.cuda_stream:
            raise ValueError("cuda_stream_priority is the priority of the engine's own stream: set cuda_stream: true")
        if self.cuda_stream_sms is not None and not self.cuda_stream:
            raise ValueError("cuda_stream_sms is the SM share of the engine's own stream: set cuda_stream: true")
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
            "submodel": ("model", "submodel"),
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
class DiTParallelConfig(RankGroupConfig):
    """Parallelism of a DiT engine: CFG halves and sequence (Ulysses) parallel ranks."""

    cfg_parallel: bool = Field(False, description="conditional/unconditional halves on two ranks")
    sequence_parallel_size: int = Field(1, ge=1, description="Ulysses all-to-all over heads")


class Token2WavStreamConfig(Strict):
    """Speech models: the streamed token2wav's first chunk (Qwen's streaming plan: chunks of 72 mel frames, 24
    frames of look-ahead, 48 of look-back; 2 mel frames per codec token). A smaller first chunk starts the audio
    after fewer codes; the chunks after it grow to the reference's."""

    first_chunk_frames: int = Field(ge=1, description=
        "mel frames (100 per second of audio, 2 per codec token) the first chunk owns; more than the vocoder "
        "overlap (20); chunk 1 then ends on the reference's next chunk boundary (a multiple of 72 at least one "
        "24-frame block past it), later chunks are the reference's")
    first_lookahead_frames: int = Field(0, ge=0, description=
        "mel frames of right context the first chunk's ODE window has (the reference: 24); its window runs once "
        "(first_chunk_frames + first_lookahead_frames) / 2 codes exist")


class DiTEngineConfig(Strict):
    """A DiT (image) engine: model, device, batching and resolution limits, CUDA graphs."""

    model: ModelConfig
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available, else CPU")
    cuda_stream: bool = Field(False, description=
        "on CUDA, this engine's device work on a stream of its own instead of the process's default stream: where "
        "engines share a process (OmniLLM's speech stages), another engine's queued work (a decode run, a "
        "token2wav ODE replay) then never holds up this one's steps")
    cuda_stream_priority: Literal["normal", "high"] = Field("normal", description=
        "with cuda_stream: the stream's priority; high: the GPU schedules this engine's pending kernels ahead of "
        "normal streams' (a streamed token2wav window is on the first audio's critical path; the AR engines' next "
        "codes have a chunk of audio as slack)")
    cuda_stream_sms: int | None = Field(None, ge=1, description=
        "with cuda_stream: the stream belongs to a CUDA green context of this many SMs and this engine's CUDA "
        "graphs are captured on it, so its kernels run there only (token2wav on the SMs its process's AR engines "
        "leave: those take the first N, this the last total - N)")
    cuda_stream_sms_side: Literal["first", "last"] = Field("last", description=
        "which SMs cuda_stream_sms counts: the GPU's first or its last (the AR engines' default is first)")
    max_batch_size: int = Field(16, ge=1, description="requests (before CFG doubling) per transformer forward")
    vae_batch_size: int = Field(8, ge=1, description="finished images VAE-decoded together")
    vae_batch_pixels: int = Field(8 * 512 * 512, ge=1, description=
        "images VAE-decoded together hold at most this many pixels (one image always decodes alone): the "
        "decoder's full-resolution activations grow with it (8 Qwen-Image images at 1024x1024 need > 10 GiB "
        "beside the 20B transformer)")
    max_pixels: int = Field(1024 * 1024, ge=64, description="height*width limit per image")
    max_steps: int = Field(100, ge=1, description="num_inference_steps limit per request")
    default_steps: int | None = Field(None, ge=1, description=
        "num_inference_steps of a request that gives none; None = the family's (PixArt 20, SD3 28, Qwen-Image 50)")
    default_size: str | None = Field(None, pattern=r"^\d+x\d+$", description=
        "'WxH' of a request that gives no size; None = the model's default (an edit: its input image's aspect ratio, "
        "scaled down to max_pixels where needed)")
    max_images_per_prompt: int = Field(4, ge=1, description="num_images_per_prompt limit per request")
    max_frames: int = Field(129, ge=1, description="video models: num_frames limit per video")
    attention_backend: Literal["auto", "default", "flash", "cudnn", "efficient", "math", "split", "ragged"] = Field(
        "auto", description="Wan and Qwen-Image on CUDA: the SDPA kernel of the attention (auto: the fastest, "
        "measured once per token count and mask; default: torch's own order; split: Qwen-Image's masked joint "
        "attention as cuDNN over the image keys and over the caption keys, merged by log-sum-exp; ragged: the "
        "same as cuDNN's variable-length attention over [image | caption] segments, no mask)")
    vae_decode_chunk: int = Field(2, ge=1, description="video models: latent frames VAE-decoded per engine "
                                  "step while other requests denoise (all at once when none does)")
    compile: bool = Field(False, description="torch.compile the transformer")
    caption_packing: bool = Field(True, description=
        "Qwen-Image: the caption stream's projections and MLP run over the batch's real caption tokens only "
        "(rows of a CFG batch pad short negative prompts to the longest prompt; the attention keeps the padded "
        "layout); used where it drops at least a quarter of the caption rows")
    vae_lean_decoder: bool = Field(True, description="Wan on CUDA: the VAE decoder's RMS norm + SiLU as one "
                                   "Triton kernel, its convolutions channels-last with the height / width padding "
                                   "inside cuDNN (the VAE's modules changed in place; its speed and its difference "
                                   "from diffusers' frames: docs/benchmarks.md, Wan); off: diffusers' modules as "
                                   "loaded")
    norm_kernels: bool = Field(True, description="Wan and Qwen-Image on CUDA, with fuse_elementwise: the blocks' "
                               "norms as Triton kernels in place of the compiled helpers (layer norm + modulation; "
                               "Wan's cross-attention layer norm and self-attention q / k RMS norm + RoPE); off: "
                               "the compiled helpers (their speed against the kernels: docs/benchmarks.md)")
    parallel: DiTParallelConfig = DiTParallelConfig()
    fuse_elementwise: bool = Field(True, description="on CUDA, torch.compile the blocks' small elementwise "
                                   "helpers (layer norm + modulation, gated residual) into fused kernels")
    cuda_graphs: bool = Field(True, description="on CUDA, capture runs of transformer blocks as CUDA graphs "
                              "(per row / caption-length bucket and resolution) and replay them")
    token2wav_precision: Literal["fp32", "tf32", "bf16"] = Field("fp32", description=
        "speech models (Qwen2.5-Omni token2wav): the DiT's matmul precision; fp32: the reference's, tf32: TF32 "
        "matmuls on CUDA (torch's process-wide switch, set while the forward runs), bf16: bfloat16 autocast "
        "(mels within the GPU tests' stated tolerance of fp32)")
    token2wav_vocoder_graphs: int = Field(64, ge=0, description=
        "speech models on CUDA with cuda_graphs: the vocoder's (BigVGAN) CUDA graphs kept, one per (row bucket, mel "
        "length): the chunk plan's lengths captured when the stage starts (a last chunk's included), others once "
        "seen twice, the least recently used dropped; 0: the vocoder runs eagerly")
    token2wav_vocoder_precision: Literal["fp32", "bf16"] = Field("fp32", description=
        "speech models: the vocoder's precision (independent of token2wav_precision); fp32: the reference's, bf16: "
        "bfloat16 autocast (its error goes straight into the waveform: see the GPU tests)")
    token2wav_fused_forward: bool = Field(True, description=
        "speech models: token2wav's DiT forward with stacked weights (every block's modulation in one GEMM, q/k/v in "
        "one, the columns' projection, rotary and masks once per ODE; with compile, each block's residual fused "
        "into the next one's norm); false: layer by layer as transformers runs it")
    token2wav_whole_ode: bool = Field(True, description=
        "speech models: requests at their first evaluation that share num_inference_steps, sway and guidance run "
        "their whole ODE in one engine step (on CUDA with cuda_graphs: one CUDA graph per shape); false: one RK4 "
        "evaluation per engine step (whole-forward graphs)")
    token2wav_hold_s: float | None = Field(None, ge=0.0, description=
        "speech models, streamed: a computable window after the first is held until the audio already sent would "
        "play out within this many seconds (played in real time from the first chunk), or until the utterance's "
        "codes are all in; held windows then start together (one batched ODE), leaving the GPU to the talker "
        "meanwhile. None: every window starts once computable")
    token2wav_first_window_alone: bool = Field(False, description=
        "speech models, one process (OmniLLM): a stream's first window's ODE runs with the process's AR engine "
        "steps held until its mel is done, so the first audio does not share the GPU with the thinker's and "
        "talker's decode; their codes and tokens come that much later (by one window's ODE). false: the windows "
        "share the GPU with them")
    token2wav_stream: Token2WavStreamConfig | None = Field(None, description=
        "speech models: the streamed token2wav's first chunk (None: Qwen's streaming plan as it is, 72 mel frames "
        "with 24 of look-ahead: the first audio after 48 codes)")
    max_sequence_length: int | None = Field(
        None, ge=1, description="caption tokens per prompt (text-encoder truncation and prompt_embeds limit); "
        "None = the family's default (PixArt 300, LLM-conditioned PixArt 1024, SD3 256 T5 tokens)")

    @model_validator(mode="after")
    def _check_stream(self):
        if self.cuda_stream_priority != "normal" and not self.cuda_stream:
            raise ValueError("cuda_stream_priority is the priority of the engine's own stream: set cuda_stream: true")
        if self.cuda_stream_sms is not None and not self.cuda_stream:
            raise ValueError("cuda_stream_sms is the SM share of the engine's own stream: set cuda_stream: true")
        return self


# ----------------------------------------------------------------------------- cluster services
class PriorityWeights(Strict):
    """Share of admissions each priority class gets while several wait (no class starves)."""

    high: float = Field(4.0, gt=0, description="weight of priority high")
    normal: float = Field(2.0, gt=0, description="weight of priority normal")
    low: float = Field(1.0, gt=0, description="weight of priority low")


class OmniSchedulerConfig(Strict):
    """The app's admission scheduler (a named Ray actor): queue bound, policy, client timings."""

    enabled: bool = Field(True, description=
        "admit requests through the scheduler (off: admitted at once, no cancellation by id)")
    policy: Literal["fifo", "priority"] = Field("priority", description=
        "admission order: arrival, or weighted by the request's priority")
    priority_weights: PriorityWeights = PriorityWeights()
    max_queue_size: int = Field(1024, ge=0, description="queued (not yet running) requests before 429")
    default_stage_capacity: int = Field(64, ge=1, description="concurrency per stage until replicas report")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After of a 429 when the queue is full")
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
    admission_lease: int = Field(8, ge=0, description=(
        "slots of a stage lent to each ingress replica while nothing queues there (at most half the "
        "free ones): it admits on them without a round trip to the actor; taken back when a queue "
        "forms. 0: every admission asks the actor"))


class DiTCacheConfig(Strict):
    """The app's DiT cache (a named Ray actor holding object-store refs): images and text conditioning."""

    enabled: bool = Field(True, description="use the DiT cache in DiT replicas")
    strategy: Literal["lru", "fifo", "lfu", "ttl"] = Field("lru", description=
        "eviction: least recent, oldest put, least hit, or soonest to expire")
    max_bytes: int = Field(1 << 30, ge=0, description="bytes of cached values (object store) before eviction")
    ttl_s: float = Field(3600.0, gt=0, description="an entry expires this long after it was put")
    cache_images: bool = Field(True, description="cache the PNGs of seeded (deterministic) image requests")
    cache_conditioning: bool = Field(True, description="cache text-encoder outputs per prompt")
    # issue 6 (dit cache) additions
    detached: bool = Field(True, description="detached actor: outlives the replica that created it")
    call_timeout_s: float = Field(5.0, gt=0, description="a client call slower than this counts as a miss")


class VideoJobsConfig(Strict):
    """The video job API (``/v1/videos``): finished MP4s live in the object store, indexed by a DiT cache
    actor of their own (``omni-dit-cache-{app}-videos``) that drops them by TTL and byte budget."""

    ttl_s: float = Field(3600.0, gt=0, description="a finished video (and its job) is kept this long")
    max_bytes: int = Field(4 << 30, ge=0, description="MP4 bytes kept in the object store before the oldest go")
    max_jobs: int = Field(1000, ge=1, description="jobs an ingress replica remembers (finished ones go first)")
    default_fps: int = Field(16, ge=1, le=120, description="frames per second when a request names none")


# ----------------------------------------------------------------------------- serve
class AutoscalingConfig(Strict):
    """Serve autoscaling of a deployment (maps onto Serve's autoscaling_config)."""

    min_replicas: int = Field(1, ge=0, description="fewest replicas")
    max_replicas: int = Field(1, ge=1, description="most replicas")
    initial_replicas: int | None = Field(None, description="replicas at start (None: min_replicas)")
    target_ongoing_requests: float = Field(32, gt=0, description=
        "requests in flight per replica the autoscaler aims at")
    upscale_delay_s: float = Field(30.0, ge=0, description="load must call for more replicas this long first")
    downscale_delay_s: float = Field(600.0, ge=0, description="load must call for fewer replicas this long first")
    metrics_interval_s: float = Field(10.0, gt=0, description="how often replicas report their load")
    look_back_period_s: float = Field(30.0, gt=0, description="window the load is averaged over")


class DeploymentConfig(Strict):
    """How Serve runs a deployment: replicas or autoscaling, concurrency, resources, health checks."""

    num_replicas: int | Literal["auto"] = Field(1, description=
        "fixed replicas, or auto (Serve's default autoscaling); ignored when autoscaling is set")
    max_ongoing_requests: int = Field(256, ge=1, description=
        "requests one replica takes at once; more wait in the caller's handle")
    autoscaling: AutoscalingConfig | None = Field(None, description=
        "autoscale between bounds instead of num_replicas")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica")
    health_check_period_s: float = Field(2.0, gt=0, description=(
        "Serve's controller checks the replica (its engine) this often; a replica whose process died is "
        "only noticed, and replaced, at its next check, so this bounds the time to recovery (Serve's own "
        "default is 10 s; a check costs one actor call)"))
    health_check_timeout_s: float = Field(30.0, gt=0, description=(
        "a health check that gets no answer this long fails; after 3 failures in a row Serve replaces the "
        "replica (a crashed process is replaced at its first failed check)"))
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, description=
        "a stopping replica gets this long to finish its requests")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per replica (ray_actor_options.resources), "
        "e.g. {ar_gpu: 1} to pin a stage to the KubeRay worker group that offers it")


class StreamingConfig(Strict):
    """How often a replica sends each open stream a message. The first goes at once; what arrives
    until the next is due is merged into one message. With N streams open, a stream's interval is
    max(min_interval_s, N / messages_per_s): a replica's Serve messages per second stay bounded
    however many clients stream, so the serving path keeps up with the engine."""

    min_interval_s: float = Field(0.02, ge=0, le=1, description="shortest interval between a stream's messages")
    messages_per_s: float = Field(1000.0, gt=0, description=(
        "a replica's budget of stream messages per second, shared by its open streams"))
    max_interval_s: float = Field(0.25, gt=0, le=5, description="longest interval between a stream's messages")

    def interval(self, open_streams: int) -> float:
        return min(self.max_interval_s, max(self.min_interval_s, open_streams / self.messages_per_s))


class ARStageConfig(Strict):
    """An AR stage: one Serve deployment whose replicas each run an AR engine."""

    kind: Literal["ar"] = Field("ar", description="an AR (text) stage")
    engine: AREngineConfig
    deployment: DeploymentConfig = DeploymentConfig()
    streaming: StreamingConfig = Field(default_factory=lambda: StreamingConfig(), description=(
        "how often this stage's replicas send each stream's merged deltas"))
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "none"] = Field("auto", description=(
        "how chat completions with tools and tool_choice auto read the model's output (vLLM's "
        "--tool-call-parser; omni_ray/tool_parsers): hermes (Qwen2.5, Qwen3, Hermes: <tool_call> JSON "
        "blocks), llama3_json (Llama 3.x: JSON objects), none (tool_choice auto is refused; required and "
        "named functions, constrained to JSON, work with any model); auto: by the checkpoint's "
        "architecture (Qwen -> hermes, Llama -> llama3_json, others none)"))
    encoder: str | None = Field(None, description=(
        "multimodal models: a key of `stages` naming an encoder stage (kind encoder) that runs this model's "
        "vision / audio towers: the replica sends a request's images and audio there and hands the "
        "embeddings (object-store refs) to its engine, which then loads no towers; none: the towers run "
        "inline in this stage's engine. Tokens are the same either way"))

    def engine_config(self) -> AREngineConfig:
        """The engine as this stage runs it: without its media towers when an encoder stage runs them."""
        return self.engine.model_copy(update={"media_towers": False}) if self.encoder else self.engine


class EncoderEngineConfig(Strict):
    """The media encoders of a multimodal checkpoint (vision / audio towers) on their own, batching the
    items of concurrent requests into one tower call per kind."""

    model: ModelConfig
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available, else CPU")
    batch_wait_s: float = Field(0.002, ge=0, le=1, description=(
        "a call waits this long for others to join its batch (the first call of an idle engine too)"))
    max_batch_tokens: int = Field(16384, ge=1, description=(
        "placeholder tokens (encoder output rows) of the items in one batch; calls past it wait for the "
        "next (a call larger than this runs alone)"))
    cache_tokens: int = Field(32768, ge=0, description=(
        "encoder output rows kept by content hash, so the same image or clip in another request is not "
        "encoded again (0: nothing kept beyond a batch)"))


class EncoderStageConfig(Strict):
    """An encoder stage: one Serve deployment whose replicas each run the media encoders of a multimodal
    checkpoint, used by the AR stages that name it in `encoder` (not a pipeline step), so encoder replicas
    scale apart from the decoder (vLLM's encode / prefill / decode split)."""

    kind: Literal["encoder"] = Field("encoder", description="a media encoder stage (vision / audio towers)")
    engine: EncoderEngineConfig
    deployment: DeploymentConfig = DeploymentConfig()


class DiTStageConfig(Strict):
    """A DiT stage: one Serve deployment whose replicas each run a DiT engine."""

    kind: Literal["dit"] = Field("dit", description="a DiT (image) stage")
    engine: DiTEngineConfig
    deployment: DeploymentConfig = DeploymentConfig()


StageConfig = Annotated[Union[ARStageConfig, DiTStageConfig, EncoderStageConfig], Field(discriminator="kind")]


class PipelineStep(Strict):
    """One step of a pipeline: which stage runs, what it takes and what it gives the next step."""

    stage: str = Field(description="a key of `stages`")
    input: Literal["prompt", "text", "hidden_states", "codec_tokens"] = Field(
        "prompt", description="what this stage takes: the request's prompt, the previous stage's text, "
                              "or its prompt hidden states; speech: a talker takes the thinker's text step (its "
                              "tokens and their hidden states), token2wav the talker's codec_tokens")
    output: Literal["text", "hidden_states", "images", "videos", "codec_tokens", "audio"] = Field("text", description=
        "what this stage gives the next: generated text, prompt hidden states (AR), images or videos (DiT; "
        "videos: MP4s over HTTP, frame arrays offline; a pipeline's last step); speech: codec_tokens (an AR "
        "stage with model.submodel talker), audio (a DiT stage running token2wav, fed codec_tokens)")
    system_prompt: str | None = Field(None, description="AR stages: a system message to wrap the input with")
    max_tokens: int | None = Field(None, ge=1, description="AR text stages: a default max_tokens")
    encoding: str | None = Field(None, description=(
        "AR hidden_states steps: the text-encoding recipe, named by a diffusers pipeline class (QwenImagePipeline, "
        "QwenImageEditPipeline: its prompt template, leading tokens dropped); set by a graph pipeline; "
        "none: the prompt's hidden states as they are"))


class PipelineGraph(Strict):
    """A pipeline written as a checkpoint's stage graph (omni_ray/graphs): the checkpoint of stage
    ``model`` names the stages it runs as and what passes between them."""

    model: str = Field(description="a key of `stages`: the stage whose checkpoint names the graph")
    stages: dict[str, str] = Field(default_factory=dict, description=
        "graph role -> a key of `stages` (e.g. text_encoder: llm); the one role left unnamed is `model`'s")


class PipelineConfig(Strict):
    """A named pipeline: stages run in order, each fed by the previous one's output. Written as
    ``steps``, or as ``graph`` (the steps follow from a checkpoint's stage graph when the app starts)."""

    steps: list[PipelineStep] = Field(default_factory=list, description="the stages in order")
    graph: PipelineGraph | None = Field(None, description="the stage graph of a stage's checkpoint, instead of steps")
    description: str = Field("", description="shown by GET /v1/pipelines")
    image: Literal["none", "optional", "required"] = Field("none", description=(
        "the request's input image (image edit, image-to-video): required goes to every step of the pipeline "
        "(the AR text encoder's vision tower, the DiT's VAE); optional: taken when given (Wan2.2 TI2V: a first "
        "frame, or text alone); none refuses one. A graph pipeline: its checkpoint's"))

    @model_validator(mode="after")
    def _steps_or_graph(self):
        if bool(self.steps) == (self.graph is not None):
            raise ValueError("give either steps or graph")
        return self


class LimitsConfig(Strict):
    """Per-request limits, enforced by the ingress before any stage is called (each violation is
    a 400 naming the field); prompt tokens of text prompts are counted by the AR replica right
    after tokenizing, before its engine sees the request."""

    max_body_bytes: int = Field(32 << 20, ge=1024, description=(
        "HTTP body bytes (Content-Length or counted); images and audio travel inside the body (base64)"))
    max_prompt_tokens: int = Field(8192, ge=1, description="tokens of one prompt (after the chat template)")
    max_tokens: int = Field(4096, ge=1, description="max_tokens / max_completion_tokens, stage_args included")
    max_n: int = Field(8, ge=1, description="choices per prompt (text n)")
    max_prompts: int = Field(16, ge=1, description="prompts in one completions request (a list of prompts)")
    max_stop_sequences: int = Field(4, ge=0, description="stop strings per request")
    max_image_pixels: int = Field(1024 * 1024, ge=64, description="height * width of one image")
    max_steps: int = Field(100, ge=1, description="num_inference_steps")
    max_images: int = Field(4, ge=1, description="images per request (image n)")


class MediaConfig(Strict):
    """Images and audio in requests (chat content parts, offline multi_modal_data): what is accepted."""

    max_image_bytes: int = Field(20 << 20, ge=1024, description="encoded bytes of one input image")
    max_image_pixels: int = Field(4096 * 4096, ge=64, description="width * height of one input image, "
                                  "checked from its header before decoding")
    max_audio_bytes: int = Field(25 << 20, ge=1024, description="encoded bytes of one input audio clip")
    max_audio_seconds: float = Field(300.0, gt=0, description="duration of one input audio clip")
    max_items: int = Field(8, ge=1, description="images + audio clips in one request")
    allow_url_fetch: bool = Field(False, description="fetch http(s) image/audio URLs (off: data: URLs only)")
    allowed_domains: list[str] = Field(default_factory=list, description=(
        "with allow_url_fetch: hosts that may be fetched (and their subdomains); empty: any"))
    fetch_timeout_s: float = Field(10.0, gt=0, description="timeout of one URL fetch")
    allowed_local_media_path: str | None = Field(None, description=(
        "file:// URLs are read only under this directory (vLLM's setting; none: never)"))


class MetricsConfig(Strict):
    """Prometheus metrics (`ray_omni_*`, through Ray's metrics API) and per-request log lines."""

    enabled: bool = Field(True, description="record metrics (omni_ray/metrics.py) in the ingress and stage replicas")
    interval_s: float = Field(5.0, gt=0, description="how often a stage replica samples its engine's stats "
                              "(queue, running, KV usage, cache rates) into gauges")
    log_requests: bool = Field(True, description="one INFO line per finished request at the ingress and per "
                               "stage request at each stage, carrying the request id")


class StageHealthConfig(Strict):
    """How each ingress replica tells whether a stage has a healthy replica (GET /health: 503 naming
    the stages without one) and what a request for such a stage gets (deployments/ingress/stage_health.py)."""

    probe_timeout_s: float = Field(0.5, gt=0, le=30, description=(
        "a probe of a stage's replicas waits this long for one to answer; GET /health probes every stage "
        "at once, so it answers within this"))
    probe_interval_s: float = Field(1.0, ge=0, description=(
        "every stage is probed this often in the background, so that a replica that died while idle is "
        "noticed before a request finds out (0: only on /health and after a call lost its replica); a stage "
        "that is down is probed every 0.2 s until a replica answers"))
    unavailable_wait_s: float = Field(5.0, ge=0, description=(
        "a request for a stage with no healthy replica (one being replaced after a crash) waits this long "
        "for one, then gets a 503 (engine_error, code stage_unavailable) with Retry-After"))
    retry_after_s: float = Field(2.0, ge=0, description="Retry-After of that 503 and of /health's 503")


class AppConfig(Strict):
    """The HTTP application: name, route, API keys, deadline, limits, the ingress deployment, metrics."""

    name: str = Field("omni", description="Serve application name (also names its scheduler and cache actors)")
    route_prefix: str = Field("/", description="HTTP route prefix of the application")
    api_keys: list[str] = Field(default_factory=list, description=(
        "Bearer keys for every HTTP path but /health (none: open); also OMNI_RAY_API_KEYS (comma-separated)"))
    request_timeout_s: float = Field(600.0, gt=0, description=(
        "end-to-end deadline of a request, admission included: past it the client gets 504 and the "
        "request is aborted in its engines"))
    limits: LimitsConfig = LimitsConfig()
    media: MediaConfig = MediaConfig()
    ingress: DeploymentConfig = DeploymentConfig(num_replicas=1, max_ongoing_requests=1024)
    streaming: StreamingConfig = Field(default_factory=lambda: StreamingConfig(), description=(
        "how often the ingress sends each SSE stream its merged events"))
    stage_call_batch: int = Field(16, ge=1, le=256, description=(
        "AR streams that reach an ingress replica together go to the stage in one Serve call, at most "
        "this many (Serve's per-call cost paid once per burst; Serve then counts the call as one "
        "ongoing request); 1: one call per request"))
    metrics: MetricsConfig = MetricsConfig()
    stage_health: StageHealthConfig = StageHealthConfig()

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        for k in keys:
            if not k.strip() or k != k.strip() or len(k) < 8:
                raise ValueError("API keys must be at least 8 characters, without surrounding whitespace")
        return keys

    def resolved_api_keys(self) -> list[str]:
        env = [k.strip() for k in os.environ.get("OMNI_RAY_API_KEYS", "").split(",") if k.strip()]
        return list(self.api_keys) + env


class OmniConfig(Strict):
    """The root: an application of stages joined into pipelines."""

    app: AppConfig = AppConfig()
    stages: dict[str, StageConfig]
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict, description=
        "named pipelines over the stages (POST /v1/pipelines/<name>)")
    scheduler: OmniSchedulerConfig = OmniSchedulerConfig()
    dit_cache: DiTCacheConfig = DiTCacheConfig()
    videos: VideoJobsConfig = VideoJobsConfig()

    @model_validator(mode="after")
    def _check_encoders(self):
        for key, stage in self.stages.items():
            enc = getattr(stage, "encoder", None)
            if enc is not None and (enc not in self.stages or self.stages[enc].kind != "encoder"):
                found = f"stage {enc!r} is {self.stages[enc].kind}" if enc in self.stages else f"no stage {enc!r}"
                raise ValueError(f"stages.{key}.encoder: names an encoder stage (kind encoder); {found}")
        return self

    @model_validator(mode="after")
    def _check_pipelines(self):
        for pname, p in self.pipelines.items():
            if p.graph is not None:
                for where, key in [("model", p.graph.model)] + [(f"stages.{r}", k) for r, k in p.graph.stages.items()]:
                    if key not in self.stages:
                        raise ValueError(f"pipelines.{pname}.graph.{where}: unknown stage {key!r}")
            for i, step in enumerate(p.steps):
                if step.stage not in self.stages:
                    raise ValueError(f"pipelines.{pname}.steps.{i}.stage: unknown stage {step.stage!r}")
                kind = self.stages[step.stage].kind
                if kind == "encoder":
                    raise ValueError(f"pipelines.{pname}.steps.{i}.stage: {step.stage!r} is an encoder stage, "
                                     "used by the AR stages that name it in `encoder`, not a pipeline step")
                if kind == "dit" and step.output not in ("images", "videos", "audio"):
                    raise ValueError(f"pipelines.{pname}.steps.{i}.output: a DiT stage outputs images, videos or "
                                     "audio")
                if kind == "ar" and step.output in ("images", "videos", "audio"):
                    raise ValueError(f"pipelines.{pname}.steps.{i}.output: an AR stage cannot output "
                                     f"{step.output}")
                talker = kind == "ar" and self.stages[step.stage].engine.model.submodel == "talker"
                if talker != (step.output == "codec_tokens"):
                    raise ValueError(f"pipelines.{pname}.steps.{i}.output: codec_tokens come from a talker stage "
                                     "(an AR stage with model.submodel: talker), and a talker gives nothing else")
                if (step.output == "audio") != (step.input == "codec_tokens"):
                    raise ValueError(f"pipelines.{pname}.steps.{i}: audio is made from codec_tokens (token2wav)")
                if i == 0 and step.input != "prompt":
                    raise ValueError(f"pipelines.{pname}.steps.0.input: the first step takes the prompt")
                if i > 0 and step.input != p.steps[i - 1].output:
                    raise ValueError(f"pipelines.{pname}.steps.{i}.input: {step.input!r} does not match "
                                     f"the previous step's output {p.steps[i - 1].output!r}")
        return self


# ----------------------------------------------------------------------------- loading
def _members(tp: Any) -> list:
    """The types a Union (or Optional) annotation allows, None left out."""
    return [a for a in get_args(tp) if a is not type(None)]


def _unwrap(tp: Any) -> Any:
    """``tp`` without ``Annotated`` and without an Optional around one type."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, UnionType) and len(_members(tp)) == 1:
            tp = _members(tp)[0]
        else:
            return tp


def _tag_member(members: list, tag: Any) -> Any:
    """The member of a discriminated union whose ``kind`` (any Literal field) default is ``tag``."""
    for m in members:
        if isinstance(m, type) and issubclass(m, BaseModel):
            if any(f.default == tag for f in m.model_fields.values() if get_origin(f.annotation) is Literal):
                return m
    return None


def user_loc(model: type[BaseModel], loc: tuple) -> tuple[tuple, Any]:
    """(``loc`` as the YAML path the user wrote, the type found there): pydantic's own levels (a
    discriminated union's tag, ``stages.llm.ar.engine``; a plain union's member, ``num_replicas.int``)
    are left out, by walking the annotations along ``loc``."""
    out, tp = [], model
    for i, part in enumerate(loc):
        tp = _unwrap(tp)
        if get_origin(tp) in (Union, UnionType):             # this level names a member, not a key
            tp = _tag_member(_members(tp), part)
            if tp is None:                                   # a plain union's member: the rest is its own
                return tuple(out) + tuple(p for p in loc[i + 1:] if isinstance(p, (int, str))
                                          and not str(p).startswith(("literal[", "function-"))), None
            continue
        out.append(part)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            f = tp.model_fields.get(part) if isinstance(part, str) else None
            tp = f.annotation if f is not None else None
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) in (list, tuple):
            tp = get_args(tp)[0]
        else:
            tp = None
    return tuple(out), _unwrap(tp)


def _message(e: dict, tp: Any) -> tuple[str, str]:
    """(extra path, message) of one pydantic error, in the user's words."""
    msg = str(e["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    disc = str((e.get("ctx") or {}).get("discriminator", "")).strip("'")
    if e["type"] == "union_tag_not_found" and disc:
        tags = [repr(f.default) for m in _members(tp) if isinstance(m, type) and issubclass(m, BaseModel)
                for f in [m.model_fields.get(disc)] if f is not None]
        return f".{disc}", f"required: one of {', '.join(tags)}" if tags else "required"
    if e["type"] == "union_tag_invalid" and disc:
        ctx = e["ctx"]
        return f".{disc}", f"{ctx.get('tag')!r} is not one of {ctx.get('expected_tags')}"
    return "", msg


def _format(err: ValidationError, model: type[BaseModel]) -> str:
    """``path.as.written: message`` per error (one line per path: a union's alternatives joined by
    "or"), errors that name their own path (model checks) as they are."""
    lines: dict[str, list[str]] = {}
    for e in err.errors():
        loc, tp = user_loc(model, tuple(e["loc"]))
        extra, msg = _message(e, tp)
        where = ".".join(str(p) for p in loc) + extra
        lines.setdefault(where.lstrip("."), [])
        if msg not in lines[where.lstrip(".")]:
            lines[where.lstrip(".")].append(msg)
    return "; ".join(f"{w}: {' or '.join(m)}" if w else " or ".join(m) for w, m in lines.items())


def validate(cls: type[BaseModel], data: Any) -> Any:
    """``cls.model_validate(data)`` raising ``ConfigError`` that names the bad field by the path
    written in the YAML (``stages.llm.engine.max_num_seqs``)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {cls.__name__}: {_format(err, cls)}") from None


def read_mapping(source: str | Path | dict) -> dict:
    """A YAML file path, a YAML string, or a dict, as a dict."""
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
    return data


def load_config(source: str | Path | dict, cls: type[BaseModel] = OmniConfig) -> Any:
    """Load a config from a YAML file path, a YAML string, or a dict."""
    return validate(cls, read_mapping(source))


def load_app_config(source: str | Path | dict | OmniConfig, app: str | None = None) -> OmniConfig:
    """An OmniConfig from a bare OmniConfig (file, YAML text, dict) or from a Serve config file
    (``serve_config.yaml``): the application named ``app`` (default: the first), its ``args.config``
    or ``args.config_path``."""
    if isinstance(source, OmniConfig):
        return source
    data = read_mapping(source)
    where = f"{source}: " if isinstance(source, (str, Path)) and "\n" not in str(source) else ""
    if "applications" not in data:
        if "stages" not in data:
            raise ConfigError(f"{where}expected an OmniConfig (top-level `stages:`) or a Serve config file "
                              f"(top-level `applications:`); found the keys {sorted(map(str, data))}")
        return validate(OmniConfig, data)
    apps = data["applications"] or []
    chosen = [a for a in apps if app is None or a.get("name") == app]
    if not chosen:
        raise ConfigError(f"no application {app!r} in the Serve config; it has {[a.get('name') for a in apps]}")
    args = chosen[0].get("args") or {}
    if args.get("config") is not None:
        return validate(OmniConfig, args["config"])
    if args.get("config_path"):
        return load_config(str(args["config_path"]))
    raise ConfigError(f"application {chosen[0].get('name')!r} has no args.config or args.config_path")
