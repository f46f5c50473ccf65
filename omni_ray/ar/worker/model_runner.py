"""Runs the decoder on one device: owns the weights, the KV cache and the decode CUDA graphs.

``run(batch)`` turns a ScheduledBatch into flat tensors (tokens of all sequences back to back),
runs one forward, samples the sequences whose prompt is complete, and returns hidden states
for prompt-only (encode) requests and for generating ones that asked (``return_hidden_states``:
each computed position's final row, decode steps' included, read from the graphs' output buffers).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from omni_ray.ar.batch import ScheduledBatch
from omni_ray.ar.grammar.masks import DecodeRun, GrammarMasks, constrained_rows
from omni_ray.ar.kernels.timing import graph_us
from omni_ray.ar.layers.attention import AttnMetadata, pick_backend
from omni_ray.ar.layers.ops import Ops
from omni_ray.ar.layers.parallel import TP1, TPContext
from omni_ray.ar.layers.sampler import SamplingTensors, apply_repetition_penalty, sample, token_logprobs
from omni_ray.ar.models import ArchConfig, build_model
from omni_ray.ar.models.loader import ReadStats, load_weights
from omni_ray.ar.sampling_params import MAX_LOGPROBS
from omni_ray.ar.sequence import Sequence
from omni_ray.ar.worker.cuda_graphs import capture_decode_graphs, decode_graph_sizes
from omni_ray.ar.worker.mixed_graphs import MixedStepGraphs
from omni_ray.ar.worker.seen_tokens import SeenTokens, has_penalty
from omni_ray.ar.worker.step_rows import StepRows
from omni_ray.config import AREngineConfig
from omni_ray.devices import green_stream, resolve_device, resolve_dtype, to_device
from omni_ray.errors import ConfigError, InvalidRequestError, ResourceError

log = logging.getLogger(__name__)

# Log-probabilities of one row (a token): ([chosen id, top-1 id, ..., top-k id], [their logprobs]).
RowLogprobs = tuple[list[int], list[float]]


# decode input rows (g_in): token, KV index, context length, rope delta (M-RoPE prompts), then the block table
BT = 4

@dataclass
class StepOutput:
    token_ids: list[int]                     # one per sampled sequence (in batch order)
    logprobs: list[RowLogprobs] | None       # one per sampled sequence, when some asked
    sampled: list[Sequence]                  # sequences that got a token
    hidden: dict[int, torch.Tensor]          # seq_id -> [n, H] hidden states of this step's rows (decode runs:
                                             # [num_steps, H], one per forward)
    multi: list[list[int]] | None = None     # multi-step decode: each sampled sequence's tokens
    multi_logprobs: list[list[RowLogprobs]] | None = None   # ... and their log-probabilities (when asked)
    prompt_logprobs: dict[int, list[RowLogprobs]] | None = None   # seq_id -> the prompt tokens this step scored


class DecodeLaunch(NamedTuple):
    """A decode run queued on the device (``launch_decode``), read by ``collect_decode``."""
    batch: ScheduledBatch
    num_steps: int
    buf: int                                 # which pinned host buffer its results go to
    tokens: torch.Tensor                     # [num_steps, n] pinned host view
    logprobs: tuple[torch.Tensor, torch.Tensor] | None   # ids, values [num_steps, n, 1 + k] pinned host views
    hidden: tuple[list[int], torch.Tensor] | None = None   # rows that asked, their [num_steps, m, H] on the way


def is_greedy(seqs: list[Sequence]) -> bool:
    """Every sequence takes the argmax and wants no log-probabilities (the graphs' own token)."""
    return all(s.params.temperature == 0 and s.params.logprobs is None for s in seqs)


def needs_eager(seq: Sequence, step_rows: bool = False) -> bool:
    """Steps of this sequence run eagerly, one token a step: its rows come as embeddings and the runner
    has no step-row buffer (``step_rows``: models fed a row per decode step, the talker, have one)."""
    return seq.input_embeds is not None and not step_rows


def wants_prompt_logprobs(seq: Sequence) -> bool:
    """A sequence still in its prompt whose prompt tokens' log-probabilities were asked for."""
    return getattr(seq.params, "prompt_logprobs", None) is not None and seq.num_computed_tokens < seq.num_prompt_tokens


def _rows(ids: torch.Tensor, vals: torch.Tensor) -> list[RowLogprobs]:
    return list(zip(ids.tolist(), vals.tolist()))


class ModelRunner:
    def __init__(self, cfg: AREngineConfig, path: Path, arch: ArchConfig, tp: TPContext = TP1,
                 device: torch.device | None = None):
        self.cfg, self.arch, self.tp = cfg, arch, tp
        self.device = device or resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.backend = pick_backend(self.device)
        self.use_graphs = self.device.type == "cuda" and not cfg.enforce_eager
        ops = Ops().for_cuda(cfg.elementwise) if self.use_graphs else Ops()
        torch.manual_seed(cfg.seed)
        with torch.device(self.device):
            model = build_model(arch, tp, self.backend, ops)
        self.model = model.to(self.dtype).eval()
        self.model.rope_cos, self.model.rope_sin = self.model.rope_cos.float(), self.model.rope_sin.float()
        self.load_stats = ReadStats()                 # what this rank read from the checkpoint
        load_weights(self.model, path, cfg.model.allow_pickle, self.load_stats)
        if self.use_graphs and self.backend == "triton":
            ops.small_m = self._pick_small_gemv()
        self.peers = None     # tensor parallel: rank 0's link to the other ranks (omni_ray.ar.executor.tensor_parallel)
        self.encoders = self._media_encoders(path)
        self.block_size = cfg.cache.block_size
        self.max_model_len = cfg.scheduler.max_model_len
        self.max_blocks = -(-self.max_model_len // self.block_size)
        cuda = self.device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 1
        self.num_blocks = self._agree_num_blocks(self._num_blocks())
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ConfigError(f"KV cache holds {self.num_blocks * self.block_size} tokens, less than "
                              f"max_model_len={self.max_model_len}; lower max_model_len or raise the KV budget")
        self._allocate_kv(self.num_blocks)
        self.decode_locks = self._decode_locks()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_sizes = decode_graph_sizes(cfg.scheduler.max_num_seqs) if self.use_graphs else []
        self._alloc_decode_buffers()
        # models fed a row per decode step (the talker): their decode graphs add it (worker/step_rows.py)
        self.step_rows = (StepRows(cfg.decode_steps, self.max_graph_bs, arch.input_size or arch.hidden_size,
                                   self.dtype, self.device) if arch.talker is not None and tp.size == 1 else None)
        self.seen: SeenTokens | None = None          # repetition penalty of decode runs (made on first use)
        self.mixed: MixedStepGraphs | None = None     # graphs of steps with prompt tokens (worker/mixed_graphs.py)
        # cuda_stream_sms: the engine's stream is a green context's, and its graphs are captured on it (a graph
        # captured elsewhere and replayed there runs on every SM: benchmarks/bench_sm_partition.py); the core
        # thread adopts it (engine_core.py)
        self.stream = (green_stream(self.device, cfg.cuda_stream_sms, cfg.cuda_stream_sms_side,
                                    cfg.cuda_stream_priority == "high")
                       if cuda and cfg.cuda_stream and cfg.cuda_stream_sms else None)
        if self.stream is not None:
            log.info("engine stream on a CUDA green context: the %s %d of %d SMs", cfg.cuda_stream_sms_side,
                     cfg.cuda_stream_sms, self.num_sms)
        if self.use_graphs:
            with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                pool = capture_decode_graphs(self)
                if cfg.mixed_graph_tokens > 0 and self.backend == "triton" and tp.size == 1:
                    self.mixed = MixedStepGraphs(self, cfg.mixed_graph_tokens)
                    self.mixed.capture(pool)

    def _media_encoders(self, path: Path):
        """The vision / audio towers of a multimodal checkpoint (single-rank engines), else None."""
        from omni_ray.ar.models.loader import read_hf_config
        from omni_ray.ar.models.mrope import MRopeSpec

        if self.tp.size > 1 or self.arch.talker is not None or MRopeSpec.from_hf(read_hf_config(path)) is None:
            return None
        from omni_ray.ar.multimodal.encoders import MediaEncoders
        return MediaEncoders(path, self.device, self.dtype, self.cfg.scheduler.encoder_cache_tokens,
                             towers=self.cfg.media_towers)

    def _pick_small_gemv(self) -> int:
        """Decode batches of <= MAX_M rows: the fused Triton GEMVs (norm / activation inside) or cuBLAS
        with separate elementwise kernels. ``small_gemv`` on/off decides; auto times one decode step's
        projections both ways, each as a CUDA graph over every layer's own weights (as a decode step
        reads them: from HBM, not L2), and keeps the faster."""
        from omni_ray.ar.kernels.triton_gemv import MAX_M
        mode = self.cfg.small_gemv
        if mode != "auto":
            self.gemv_timing = {"use_triton": mode == "on"}
            return MAX_M if mode == "on" else 0
        ops = self.model.ops
        t_cublas = self._time_projections(ops, 0)
        t_triton = self._time_projections(ops, MAX_M)
        use = t_triton < t_cublas
        log.info("batch-1 projections per step: fused Triton GEMVs %.0f us vs cuBLAS + elementwise %.0f us -> %s",
                 t_triton, t_cublas, "Triton" if use else "cuBLAS")
        self.gemv_timing = {"triton_us": t_triton, "cublas_us": t_cublas, "use_triton": use}
        return MAX_M if use else 0

    @torch.inference_mode()
    def _time_projections(self, ops, small_m: int) -> float:
        """us per replay of a graph running every layer's four projections (with what precedes each)
        at batch 1, with ``ops.small_m`` set to ``small_m``."""
        ops.small_m = small_m
        h = self.arch.hidden_size
        x = torch.randn(1, h, device=self.device, dtype=self.dtype)
        res = torch.randn_like(x)

        def body():
            for layer in self.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                ln = layer.input_layernorm
                qkv, r = ops.norm_linear(x, res, ln.weight, ln.eps, attn.qkv_proj.weight, attn.qkv_proj.bias)
                o = ops.linear(qkv[:, : attn.o_proj.weight.shape[1]], attn.o_proj.weight)
                ln = layer.post_attention_layernorm
                gu, r = ops.norm_linear(o, r, ln.weight, ln.eps, mlp.gate_up_proj.weight)
                ops.silu_mul_linear(gu, mlp.down_proj.weight)

        return graph_us(body)

    # ------------------------------------------------------------------ KV cache
    @property
    def block_bytes(self) -> int:
        attn = self.model.layers[0].self_attn
        return 2 * self.arch.num_layers * self.block_size * attn.nkv * attn.d * self.dtype.itemsize

    def _num_blocks(self) -> int:
        if self.cfg.cache.num_blocks > 0:
            return self.cfg.cache.num_blocks
        if self.device.type != "cuda":
            return max(1, self.cfg.cache.cpu_kv_bytes // self.block_bytes)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._profile_forward()
        free, total = torch.cuda.mem_get_info()
        used = total - free
        peak_extra = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        avail = total * self.cfg.cache.gpu_memory_utilization - used - peak_extra
        n = int(avail // self.block_bytes)
        if n < 1:
            raise ResourceError(f"no GPU memory left for the KV cache (available {avail / 2**30:.2f} GiB)")
        return n

    def _agree_num_blocks(self, n: int) -> int:
        """Tensor-parallel ranks must hold the same number of blocks: the smallest (also brings the
        NCCL communicator up before any CUDA graph capture)."""
        if self.tp.size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.tp.group)
        return int(t.item())

    def _profile_forward(self) -> None:
        """A forward of max_num_batched_tokens prompt tokens (and a full batch of logits)."""
        sch = self.cfg.scheduler
        n = min(sch.max_num_batched_tokens, sch.max_num_seqs * self.max_model_len)
        seq_len = min(n, self.max_model_len)
        n_seqs = max(1, n // seq_len)
        blocks = n_seqs * (-(-seq_len // self.block_size))
        self._allocate_kv(blocks)
        bt = torch.arange(blocks, dtype=torch.int32, device=self.device).view(n_seqs, -1)
        total = n_seqs * seq_len
        meta = AttnMetadata(
            slot_mapping=torch.arange(total, device=self.device),
            context_lens=torch.full((n_seqs,), seq_len, dtype=torch.int32, device=self.device),
            block_tables=bt, cu_seqlens_q=torch.arange(0, total + 1, seq_len, dtype=torch.int32, device=self.device),
            num_decodes=0, max_query_len=seq_len, max_context_len=seq_len,
            q_lens=[seq_len] * n_seqs, ctx_lens=[seq_len] * n_seqs)
        ids = torch.zeros(total, dtype=torch.long, device=self.device)
        pos = torch.arange(seq_len, device=self.device).repeat(n_seqs)
        with torch.inference_mode():
            h, _ = self.model(ids, pos, meta)
            n = sch.max_num_seqs
            self.model.compute_logits(h[:n].repeat(-(-n // h.shape[0]), 1)[:n])
        torch.cuda.synchronize()
        self._allocate_kv(0)

    def _allocate_kv(self, num_blocks: int) -> None:
        """num_blocks usable blocks + one scratch block (padding rows of CUDA graphs write there)."""
        attn0 = self.model.layers[0].self_attn
        shape = (2, self.arch.num_layers, num_blocks + 1, self.block_size, attn0.nkv, attn0.d)
        self.kv_cache = None
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device) if num_blocks else None
        for i, layer in enumerate(self.model.layers):
            a = layer.self_attn.attn
            a.k_cache = self.kv_cache[0, i] if num_blocks else torch.tensor([])
            a.v_cache = self.kv_cache[1, i] if num_blocks else torch.tensor([])
        self.scratch_slot = num_blocks * self.block_size

    def _decode_locks(self) -> torch.Tensor | None:
        """Arrival counters of the in-kernel split merge (decode_merge="kernel"): one per (sequence,
        KV head), left at zero by every launch, so one buffer serves every layer and graph."""
        if self.backend != "triton" or self.cfg.decode_merge != "kernel":
            return None
        n = self.cfg.scheduler.max_num_seqs * self.model.layers[0].self_attn.nkv
        return torch.zeros(n, dtype=torch.int32, device=self.device)

    # ------------------------------------------------------------------ inputs
    def _splits(self, batch: int, max_ctx: int) -> int:
        if self.backend != "triton":
            return 1
        from omni_ray.ar.kernels.triton_attention import decode_splits
        return decode_splits(batch, self.model.layers[0].self_attn.nkv, max_ctx, self.num_sms)

    def prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        ids, pos, slots, q_lens, ctx_lens = [], [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new):
            start = seq.num_computed_tokens
            bt = seq.block_table
            ids.extend(seq.token_ids[start:start + n])
            if n == 1:
                pos.append(start)
                slots.append(bt[start // bs] * bs + start % bs)
            else:
                p = np.arange(start, start + n)
                pos.extend(p.tolist())
                slots.extend((np.asarray(bt)[p // bs] * bs + p % bs).tolist())
            q_lens.append(n)
            ctx_lens.append(start + n)
        # block-table width rounded up to 16 columns: one stride class for Triton's specialization
        width = -(-max(len(s.block_table) for s in batch.seqs) // 16) * 16
        table = np.zeros((len(batch.seqs), width), dtype=np.int32)
        for i, seq in enumerate(batch.seqs):
            table[i, : len(seq.block_table)] = seq.block_table
        cu = np.zeros(len(q_lens) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu[1:])
        dev = self.device
        t = lambda x, dt: to_device(np.asarray(x), dev, dt)  # noqa: E731
        if any(s.has_mrope_positions for s in batch.seqs):
            pos = self._mm_positions(batch, pos, cu)                  # [3, N] rope positions
        meta = AttnMetadata(
            slot_mapping=t(slots, torch.int64), context_lens=t(ctx_lens, torch.int32),
            block_tables=to_device(table, dev), cu_seqlens_q=t(cu, torch.int32),
            num_decodes=batch.num_decodes, max_query_len=max(q_lens), max_context_len=max(ctx_lens),
            q_lens=q_lens, ctx_lens=ctx_lens)
        meta.decode_splits = self._splits(batch.num_decodes, meta.max_context_len)
        meta.decode_locks = self.decode_locks
        return t(ids, torch.int64), t(pos, torch.int64), meta, cu

    @staticmethod
    def _mm_positions(batch: ScheduledBatch, pos: list[int], cu: np.ndarray) -> torch.Tensor:
        """Rope positions [3, N] of a batch with multimodal sequences: theirs from their M-RoPE
        layout (``Sequence.positions``), everyone else's 1-D position on all three rows."""
        out = torch.as_tensor(pos, dtype=torch.long).expand(3, -1).clone()
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            if seq.has_mrope_positions:
                out[:, cu[i]:cu[i + 1]] = seq.positions(seq.num_computed_tokens, n)
        return out

    def _mm_embeds(self, batch: ScheduledBatch, cu: np.ndarray):
        """Encoder outputs for the placeholder tokens this step computes (None when there are none)."""
        chunks = [(int(cu[i]), s, s.num_computed_tokens, n) for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new))
                  if s.mm is not None and s.mm.items and s.num_computed_tokens < s.mm.items[-1].end]
        if not chunks:
            return None
        if self.encoders is None:
            raise InvalidRequestError("this engine runs no media encoders (multimodal prompts need "
                                      "tensor_parallel_size 1 for now)", param="multi_modal_data")
        return self.encoders.embeds(chunks)

    def _input_embeds(self, batch: ScheduledBatch, cu: np.ndarray, media):
        """Rows of this step that come as embeddings (``Sequence.input_embeds``): (replacing rows, values)
        merged with the media rows ``media``, and (added rows, values); each None when there are none."""
        rep_i, rep_v, add_i, add_v = [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            if seq.input_embeds is None:
                continue
            ri, rv, ai, av = seq.input_embeds.rows(seq.num_computed_tokens, n)
            if rv is not None:
                rep_i += [int(cu[i]) + j for j in ri]
                rep_v.append(rv)
            if av is not None:
                add_i += [int(cu[i]) + j for j in ai]
                add_v.append(av)
        if not rep_i and not add_i:
            return media, None
        dev, dt = self.device, self.dtype
        if rep_i:
            rows = to_device(rep_i, dev, torch.long)
            vals = to_device(torch.cat(rep_v), dev).to(dt)
            if media is not None:
                rows, vals = torch.cat([media[0], rows]), torch.cat([media[1].to(dt), vals])
            media = (rows, vals)
        add = (to_device(add_i, dev, torch.long), to_device(torch.cat(add_v), dev).to(dt)) if add_i else None
        return media, add

    def _seen_tokens(self) -> SeenTokens:
        """The repetition penalty's device mask (worker/seen_tokens.py), made on first use."""
        if self.seen is None:
            self.seen = SeenTokens(self.max_graph_bs, self.arch.vocab_size, self.dtype, self.device)
        return self.seen

    def _sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        ps = [s.params for s in seqs]
        dev = self.device
        temp = to_device([p.temperature for p in ps], dev, torch.float32)
        top_k = to_device([max(p.top_k, 0) for p in ps], dev, torch.int64)
        top_p = to_device([p.top_p for p in ps], dev, torch.float32)
        min_p = to_device([p.min_p for p in ps], dev, torch.float32)
        return SamplingTensors(
            temp, top_k, top_p, min_p, [s.generator for s in seqs],
            need_topk_topp=any(p.top_k > 0 or p.top_p < 1.0 for p in ps if p.temperature > 0),
            need_min_p=any(p.min_p > 0 for p in ps if p.temperature > 0),
            all_greedy=all(p.temperature == 0 for p in ps),
            num_logprobs=max((p.logprobs for p in ps if p.logprobs is not None), default=-1))

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, num_steps: int = 1) -> StepOutput:
        """One step of ``batch`` (``num_steps`` greedy decode steps when the engine asks for them)."""
        n = len(batch.seqs)
        embedded = any(s.input_embeds is not None for s in batch.seqs)
        if (batch.num_decodes == n and n <= self.max_graph_bs
                and not any(needs_eager(s, self.step_rows is not None) for s in batch.seqs)
                and not any(s.is_encode for s in batch.seqs)):
            return self._run_decode(batch, num_steps)
        assert num_steps == 1, "multi-step runs are for pure decode batches"
        scored = [i for i, s in enumerate(batch.seqs) if wants_prompt_logprobs(s)]   # every prompt row's logits
        if (self.mixed is not None and self.mixed.covers(batch) and not scored
                and not embedded and not any(s.is_encode or s.mm is not None for s in batch.seqs)):
            return self._run_mixed(batch)
        ids, pos, meta, cu = self.prepare(batch)
        embeds, add = self._input_embeds(batch, cu, self._mm_embeds(batch, cu))
        encode = [i for i, s in enumerate(batch.seqs) if s.is_encode]
        layers = tuple(sorted({self._layer_index(batch.seqs[i]) for i in encode} - {self.arch.num_layers}))
        # rows that produce a token: sequences whose known tokens are all computed after this step
        sampled = [i for i, (s, k) in enumerate(zip(batch.seqs, batch.num_new))
                   if not s.is_encode and s.num_computed_tokens + k == len(s)]
        rows = to_device(cu[1:][sampled] - 1, self.device) if sampled else None
        if self.peers is not None:
            self.peers.forward(ids, pos, meta, rows)
        hidden, captured, logits = self._forward(ids, pos, meta, layers, rows, embeds, add)
        out = StepOutput([], None, [batch.seqs[i] for i in sampled], {})
        if sampled:
            self._sample(logits, out)
        if scored:
            out.prompt_logprobs = {batch.seqs[i].seq_id: self._prompt_logprobs(batch.seqs[i], hidden[cu[i]:cu[i + 1]])
                                   for i in scored}
        if want := [(batch.seqs[i], int(cu[i]), int(cu[i + 1])) for i, s in enumerate(batch.seqs) if s.wants_hidden]:
            self._hidden_out(out, want, hidden)
        for i in encode:
            seq, layer = batch.seqs[i], self._layer_index(batch.seqs[i])
            src = hidden if layer == self.arch.num_layers else captured[layer]
            skip = min(max(0, seq.num_dropped_rows - seq.num_computed_tokens), int(cu[i + 1] - cu[i]))
            out.hidden[seq.seq_id] = src[cu[i] + skip:cu[i + 1]].float().cpu()
        return out

    def _run_mixed(self, batch: ScheduledBatch) -> StepOutput:
        """A step with prompt tokens, as a CUDA graph replay of its token bucket."""
        t, idx = self.mixed.fill(batch)
        self.mixed.replay(t)
        out = StepOutput([], None, [batch.seqs[i] for i in idx], {})
        if want := [(s, *self.mixed.span(j)) for j, s in enumerate(batch.seqs) if s.wants_hidden]:
            self._hidden_out(out, want, self.mixed.g_hidden)
        if idx:
            self._sample(self.g_logits[:len(idx)], out)
        return out

    @staticmethod
    def _hidden_out(out: StepOutput, want: list[tuple[Sequence, int, int]], hidden: torch.Tensor) -> None:
        """Rows ``a:b`` of ``hidden`` for each (sequence, a, b) that asked, float32 on the host (one copy)."""
        idx = np.concatenate([np.arange(a, b) for _, a, b in want])
        rows = hidden[torch.from_numpy(idx).to(hidden.device, non_blocking=True)].float().cpu()
        k = 0
        for seq, a, b in want:
            out.hidden[seq.seq_id] = rows[k:k + b - a]
            k += b - a

    def _forward(self, ids, pos, meta: AttnMetadata, layers: tuple[int, ...], rows: torch.Tensor | None,
                 embeds=None, add=None):
        """The eager forward (every tensor-parallel rank runs it): hidden [N, H], captured layers,
        logits of ``rows`` (None when no row samples). ``embeds``: rows replacing token embeddings (media
        encoder outputs, prompt embeddings), ``add``: rows added to them (rank 0 only)."""
        hidden, captured = self.model(ids, pos, meta, layers, embeds=embeds, add_embeds=add)
        logits = self.model.compute_logits(hidden[rows]) if rows is not None else None
        return hidden, captured, logits

    def _masks(self) -> GrammarMasks:
        """Structured outputs' bitmask buffers (omni_ray/ar/grammar/masks.py), made on first use."""
        if self.grammar_masks is None:
            rows_max = max(self.max_graph_bs, self.cfg.scheduler.max_num_seqs)
            self.grammar_masks = GrammarMasks(self.arch.vocab_size, rows_max, self.device,
                                              self.cfg.structured_outputs.fill_threads)
        return self.grammar_masks

    def _sample(self, logits: torch.Tensor, out: StepOutput) -> None:
        if rows := [i for i, s in enumerate(out.sampled) if s.params.repetition_penalty != 1.0]:
            apply_repetition_penalty(logits, rows, [out.sampled[i].token_ids for i in rows],
                                     [out.sampled[i].params.repetition_penalty for i in rows])
        if rows := constrained_rows(out.sampled):      # host fill while the device computes the forward
            self._masks().apply(logits, [out.sampled[i].grammar.matcher for i in rows], rows)
        if is_greedy(out.sampled):
            out.token_ids = logits.argmax(-1).tolist()          # greedy fast path: no sampling tensors
            return
        tokens, logprobs = sample(logits, self._sampling_tensors(out.sampled))
        out.token_ids = tokens.tolist()
        out.logprobs = _rows(*logprobs) if logprobs is not None else None

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, chunk: int = 512) -> list[RowLogprobs]:
        """The log-probabilities of the prompt tokens that this step's rows of ``seq`` predict (row at
        position p scores token p + 1), from the first not yet scored (a chunked prefill scores its
        prompt chunk by chunk; a recomputed sequence scores nothing twice). Logits in chunks of rows."""
        start = seq.num_computed_tokens                       # position of hidden[0]
        first = max(start, len(seq.prompt_logprobs) - 1)      # first row whose target is not scored yet
        end = min(start + hidden.shape[0], seq.num_prompt_tokens - 1)   # rows past it predict outputs
        out: list[RowLogprobs] = []
        for a in range(first, end, chunk):
            b = min(a + chunk, end)
            logits = self.model.compute_logits(hidden[a - start:b - start])
            targets = torch.as_tensor(seq.token_ids[a + 1:b + 1], device=logits.device)
            out += _rows(*token_logprobs(logits, targets, seq.params.prompt_logprobs))
        return out

    def _run_decode(self, batch: ScheduledBatch, num_steps: int) -> StepOutput:
        """A pure-decode batch: one packed host->device copy of the inputs, then ``num_steps`` forwards
        back to back (CUDA-graph replays on GPU), each feeding its token to the next on the device.
        The host waits once, at the end; the k tokens are exactly what k single steps would give."""
        return self.collect_decode(self.launch_decode(batch, num_steps))

    @torch.inference_mode()
    def launch_decode(self, batch: ScheduledBatch, num_steps: int, resume: bool = False) -> DecodeLaunch:
        """Decode forwards of ``batch`` queued on the device, their tokens (and log-probabilities) on
        their way to a pinned host buffer (one of two, so that the next launch can be queued before
        this one is read); ``collect_decode`` waits for them. Greedy batches take the graphs' own
        argmax; others are sampled on the device between the forwards (no host sync; a seeded
        request draws from its own generator once per step, as in single steps). ``resume``: the
        same batch again, right after the previous launch, from where the device left it (tokens,
        positions and context lengths advance on the device; the caller has checked that the block
        tables have room)."""
        seqs = batch.seqs
        n = len(seqs)
        if not resume:                  # a resumed run: the same sequences, the same sampling tensors
            rows = constrained_rows(seqs)
            # constrained rows: each step's masks filled on the host while its forward runs (not resumable)
            assert not (rows and resume), "a batch with grammar-constrained rows is never resumed"
            self._launch_grammar = DecodeRun(self._masks(), seqs, rows) if rows else None
            penalized = any(has_penalty(s) for s in seqs)
            self._launch_seen = self._seen_tokens() if penalized else None
            if penalized:
                self._launch_seen.load(seqs)
            self._launch_st = None if is_greedy(seqs) and not rows and not penalized else self._sampling_tensors(seqs)
        st = self._launch_st
        buf = self._tok_buf = 1 - self._tok_buf
        self._fill_decode(seqs, num_steps, resume, st, buf)
        tokens = self.h_tok[buf][:num_steps * n].view(num_steps, n)         # contiguous: an async copy
        tokens.copy_(self.g_tokens[:num_steps, :n], non_blocking=True)
        logprobs = None
        if st is not None and st.want_logprobs:
            w = 1 + st.num_logprobs
            logprobs = (self.h_lp_ids[buf][:num_steps * n * w].view(num_steps, n, w),
                        self.h_lp[buf][:num_steps * n * w].view(num_steps, n, w))
            logprobs[0].copy_(self.g_lp_ids[:num_steps, :n, :w], non_blocking=True)
            logprobs[1].copy_(self.g_lp[:num_steps, :n, :w], non_blocking=True)
        hidden = None
        if want := [i for i, s in enumerate(seqs) if s.wants_hidden]:     # only rows that asked leave the device
            rows = to_device(want, self.device)
            hidden = (want, self.g_hidden[:num_steps, rows].to("cpu", non_blocking=True))   # [num_steps, m, H]
        if self.device.type == "cuda":
            self.tok_ready[buf].record()
        return DecodeLaunch(batch, num_steps, buf, tokens, logprobs, hidden)

    def collect_decode(self, launched: DecodeLaunch) -> StepOutput:
        """The results of a ``launch_decode``: StepOutput.token_ids / .logprobs (first step) and
        .multi / .multi_logprobs [n][k]."""
        if self.device.type == "cuda":
            self.tok_ready[launched.buf].synchronize()
        out = StepOutput(launched.tokens[0].tolist(), None, list(launched.batch.seqs), {})
        if launched.hidden is not None:
            want, rows = launched.hidden
            rows = rows.float().transpose(0, 1).contiguous()              # [m, num_steps, H]
            for j, i in enumerate(want):
                out.hidden[launched.batch.seqs[i].seq_id] = rows[j]
        if launched.logprobs is not None:
            ids, vals = launched.logprobs
            out.logprobs = _rows(ids[0], vals[0])
        if launched.num_steps > 1:
            out.multi = launched.tokens.t().tolist()                      # [n][num_steps]
            if launched.logprobs is not None:
                ids, vals = (x.transpose(0, 1).tolist() for x in launched.logprobs)    # [n][num_steps][1 + k]
                out.multi_logprobs = [list(zip(a, b)) for a, b in zip(ids, vals)]
        return out

    def _fill_decode(self, seqs: list[Sequence], num_steps: int, resume: bool = False,
                     st: SamplingTensors | None = None, buf: int = 0) -> int:
        """Decode inputs of ``seqs`` to the device (unless ``resume``; step rows always, a resumed run's
        ``num_steps`` later than the sequences say: the run in flight is not applied yet), then the
        forwards; returns the graph batch size. Padding rows aim every block-table column at the
        scratch block, so that however far a resumed run advances them they write there."""
        n = len(seqs)
        bs = next(b for b in self.graph_sizes if b >= n) if self.graphs else n
        if not resume:
            rows = self.h_in_np[:bs]
            rows[n:bs] = 0
            rows[n:bs, BT:] = self.num_blocks                     # padding rows write to the scratch block
            for i, s in enumerate(seqs):
                p = len(s) - 1
                row = rows[i]
                row[0], row[1], row[2], row[3] = s.token_ids[-1], p, p + 1, s.rope_delta
                row[BT:BT + len(s.block_table)] = s.block_table
            self.g_in[:bs].copy_(self.h_in[:bs], non_blocking=True)
        if self.step_rows is not None:
            self.step_rows.fill(seqs, num_steps, bs, buf, offset=num_steps if resume else 0)
        splits = 0 if self.graphs else self._splits(n, max(len(s) for s in seqs) + num_steps)
        sampled = n if st is not None else 0
        if self.peers is not None:
            self.peers.decode(bs, num_steps, splits, sampled)
        self._decode_forwards(bs, num_steps, splits, sampled, st)
        return bs

    def _decode_forwards(self, bs: int, num_steps: int, splits: int, sampled: int = 0,
                         st: SamplingTensors | None = None) -> None:
        """``num_steps`` decode forwards on g_in[:bs] (graph replays on GPU); every TP rank runs this.
        ``sampled`` rows [:n] take a sampled token instead of the argmax: rank 0 samples them after
        each forward (``st``) as the step's token; under tensor parallelism it broadcasts them, and
        every rank feeds them to its next forward."""
        self.g_step.zero_()
        grammar = self._launch_grammar if st is not None else None
        seen = self._launch_seen if st is not None else None
        for step in range(num_steps):
            if self.graphs:
                self.graphs[bs].replay()
            else:
                self._decode_body(bs, self._decode_meta(bs, splits))
            if not sampled:
                continue
            nxt = self.g_next[:sampled]                                   # [n] int32, contiguous
            if st is not None:
                if seen is not None:                                      # repetition penalty, on the device
                    seen.apply(self.g_logits[:sampled])
                if grammar is not None:                                   # masks filled while the graph runs
                    grammar.mask(self.g_logits[:sampled], step)
                ids, logprobs = sample(self.g_logits[:sampled], st)       # [n], ([n, 1 + k] x 2) | None
                if grammar is not None:
                    grammar.sampled(ids, last=step == num_steps - 1)
                if seen is not None:
                    seen.mark(ids)
                self.g_tokens[step, :sampled] = ids
                if logprobs is not None:
                    w = logprobs[0].shape[1]
                    self.g_lp_ids[step, :sampled, :w] = logprobs[0]
                    self.g_lp[step, :sampled, :w] = logprobs[1]
                nxt.copy_(ids)
            if self.tp.size > 1:
                dist.broadcast(nxt, src=0, group=self.tp.group)
            self.g_in[:sampled, 0] = nxt                # the next forward's input (or a resumed run's)
        if grammar is not None:
            grammar.finish()

    def _layer_index(self, seq: Sequence) -> int:
        layer = seq.params.layer
        if layer is None:
            layer = self.cfg.hidden_states_layer
        return layer % (self.arch.num_layers + 1)

    # ------------------------------------------------------------------ decode steps (CUDA graphs)
    def _alloc_decode_buffers(self) -> None:
        """Persistent inputs/outputs of decode steps (what the graphs read and write).
        g_in rows: [token, KV index, context length, rope delta, block table ...] (int32; the rope
        position is the KV index + delta, which only M-RoPE prompts make non-zero), filled from a pinned
        host copy in one transfer; g_tokens[step, row]: each step's token (the argmax, or
        what was sampled), g_hidden[step, row]: its final hidden state (copied to the host only for
        sequences that asked, ``return_hidden_states``), g_lp_ids / g_lp[step, row, :1 + k] its id and top-k ids / their
        log-probabilities when asked (k up to MAX_LOGPROBS; only the asked columns are written and read)."""
        mb = self.max_graph_bs = max(self.graph_sizes) if self.graph_sizes else self.cfg.scheduler.max_num_seqs
        dev, cuda = self.device, self.device.type == "cuda"
        cols = BT + self.max_blocks
        self.h_in = torch.zeros(mb, cols, dtype=torch.int32, pin_memory=cuda)
        self.h_in_np = self.h_in.numpy()
        self.g_in = torch.zeros(mb, cols, dtype=torch.int32, device=dev)
        steps = self.cfg.decode_steps
        self.g_tokens = torch.zeros(steps, mb, dtype=torch.int64, device=dev)
        self.g_hidden = torch.zeros(steps, mb, self.arch.hidden_size, dtype=self.dtype, device=dev)
        self.h_tok = [torch.zeros(steps * mb, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        w = 1 + MAX_LOGPROBS
        self.g_lp = torch.zeros(steps, mb, w, dtype=torch.float32, device=dev)   # sampled runs' log-probs
        self.g_lp_ids = torch.zeros(steps, mb, w, dtype=torch.int64, device=dev)
        self.g_next = torch.zeros(mb, dtype=torch.int32, device=dev)             # ... and next input tokens
        self.h_lp = [torch.zeros(steps * mb * w, dtype=torch.float32, pin_memory=cuda) for _ in range(2)]
        self.h_lp_ids = [torch.zeros(steps * mb * w, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self.tok_ready = [torch.cuda.Event() for _ in range(2)] if cuda else None
        self._tok_buf = 0
        self._launch_st: SamplingTensors | None = None     # the last launch's (a resumed run reuses them)
        self._launch_grammar: DecodeRun | None = None       # the last launch's constrained rows
        self._launch_seen: SeenTokens | None = None         # ... its tokens so far (repetition penalty)
        self.grammar_masks: GrammarMasks | None = None      # structured outputs' bitmasks (created on first use)
        self.g_step = torch.zeros(1, dtype=torch.int64, device=dev)
        self.g_logits = torch.zeros(mb, self.arch.vocab_size, dtype=self.dtype, device=dev)

    def _decode_meta(self, bs: int, splits: int) -> AttnMetadata:
        inp = self.g_in[:bs]
        return AttnMetadata(slot_mapping=None, context_lens=inp[:, 2], block_tables=inp[:, BT:],
                            cu_seqlens_q=None, num_decodes=bs, max_query_len=1,
                            max_context_len=self.max_model_len, decode_splits=splits,
                            decode_locks=self.decode_locks)

    def _decode_body(self, bs: int, meta: AttnMetadata) -> None:
        """One decode step on rows [:bs] of g_in, then advance g_in to the next step on the device."""
        inp = self.g_in[:bs]                                              # [bs, BT + max_blocks] int32
        ids, pos = inp[:, 0].contiguous(), inp[:, 1].contiguous()         # pos: the KV slot's index
        meta.context_lens = inp[:, 2].contiguous()
        blk = inp[:, BT:].gather(1, (pos // self.block_size).long().unsqueeze(1)).squeeze(1)
        meta.slot_mapping = blk.long() * self.block_size + (pos % self.block_size).long()
        add = self.step_rows.read(self.g_step, bs) if self.step_rows is not None else None    # talker: step rows
        hidden = self.model(ids, pos + inp[:, 3], meta, add_embeds=add)[0]    # rope position: + M-RoPE delta
        logits = self.model.compute_logits(hidden)
        self.g_logits[:bs] = logits
        self.g_hidden[:, :bs].index_copy_(0, self.g_step, hidden.unsqueeze(0))
        nxt = logits.argmax(-1)                                           # greedy token [bs]
        self.g_tokens[:, :bs].index_copy_(0, self.g_step, nxt.unsqueeze(0))
        self.g_step.add_(1)
        inp[:, 0] = nxt.to(torch.int32)
        inp[:, 1:3] += 1
