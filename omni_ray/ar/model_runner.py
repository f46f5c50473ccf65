"""Runs the decoder on one device: owns the weights, the KV cache and the decode CUDA graphs.

``run(batch)`` turns a ScheduledBatch into flat tensors (tokens of all sequences back to back),
runs one forward, samples the sequences whose prompt is complete, and returns hidden states
for prompt-only (encode) requests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omni_ray.ar.layers.attention import AttnMetadata, pick_backend
from omni_ray.ar.layers.ops import Ops
from omni_ray.ar.layers.parallel import TP1, TPContext
from omni_ray.ar.layers.sampler import SamplingTensors, sample
from omni_ray.ar.loader import load_weights
from omni_ray.ar.models import ArchConfig, DecoderForCausalLM
from omni_ray.ar.scheduler import ScheduledBatch
from omni_ray.ar.sequence import Sequence
from omni_ray.config import AREngineConfig
from omni_ray.errors import ConfigError, ResourceError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class StepOutput:
    token_ids: list[int]                     # one per sampled sequence (in batch order)
    logprobs: list[float] | None
    sampled: list[Sequence]                  # sequences that got a token
    hidden: dict[int, torch.Tensor]          # seq_id -> [n, H] hidden states of this step's rows


class ModelRunner:
    def __init__(self, cfg: AREngineConfig, path: Path, arch: ArchConfig, tp: TPContext = TP1,
                 device: torch.device | None = None):
        self.cfg, self.arch, self.tp = cfg, arch, tp
        self.device = device or resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.backend = pick_backend(self.device)
        self.use_graphs = self.device.type == "cuda" and not cfg.enforce_eager
        ops = Ops().compile() if self.use_graphs else Ops()
        torch.manual_seed(cfg.seed)
        with torch.device(self.device):
            model = DecoderForCausalLM(arch, tp, self.backend, ops)
        self.model = model.to(self.dtype).eval()
        self.model.rope_cos, self.model.rope_sin = self.model.rope_cos.float(), self.model.rope_sin.float()
        load_weights(self.model, path, cfg.model.allow_pickle)
        self.block_size = cfg.cache.block_size
        self.max_model_len = cfg.scheduler.max_model_len
        self.max_blocks = -(-self.max_model_len // self.block_size)
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 1
        self.num_blocks = self._num_blocks()
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ConfigError(f"KV cache holds {self.num_blocks * self.block_size} tokens, less than "
                              f"max_model_len={self.max_model_len}; lower max_model_len or raise the KV budget")
        self._allocate_kv(self.num_blocks)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.use_graphs:
            self._capture_graphs()

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
            self.model.compute_logits(h[: sch.max_num_seqs].repeat(-(-sch.max_num_seqs // h.shape[0]), 1)[: sch.max_num_seqs])
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

    # ------------------------------------------------------------------ inputs
    def _splits(self, batch: int, max_ctx: int) -> int:
        if self.backend != "triton":
            return 1
        from omni_ray.ar.layers.triton_attention import decode_splits
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
        width = max(len(s.block_table) for s in batch.seqs)
        table = np.zeros((len(batch.seqs), width), dtype=np.int32)
        for i, seq in enumerate(batch.seqs):
            table[i, : len(seq.block_table)] = seq.block_table
        cu = np.zeros(len(q_lens) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu[1:])
        dev = self.device
        t = lambda x, dt: torch.as_tensor(np.asarray(x), dtype=dt).to(dev, non_blocking=True)  # noqa: E731
        meta = AttnMetadata(
            slot_mapping=t(slots, torch.int64), context_lens=t(ctx_lens, torch.int32),
            block_tables=torch.from_numpy(table).to(dev, non_blocking=True), cu_seqlens_q=t(cu, torch.int32),
            num_decodes=batch.num_decodes, max_query_len=max(q_lens), max_context_len=max(ctx_lens),
            q_lens=q_lens, ctx_lens=ctx_lens)
        meta.decode_splits = self._splits(batch.num_decodes, meta.max_context_len)
        return t(ids, torch.int64), t(pos, torch.int64), meta, cu

    def _sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        ps = [s.params for s in seqs]
        dev = self.device
        temp = torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=dev)
        top_k = torch.tensor([max(p.top_k, 0) for p in ps], dtype=torch.int64, device=dev)
        top_p = torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=dev)
        min_p = torch.tensor([p.min_p for p in ps], dtype=torch.float32, device=dev)
        return SamplingTensors(
            temp, top_k, top_p, min_p, [s.generator for s in seqs],
            need_topk_topp=any(p.top_k > 0 or p.top_p < 1.0 for p in ps if p.temperature > 0),
            need_min_p=any(p.min_p > 0 for p in ps if p.temperature > 0),
            all_greedy=all(p.temperature == 0 for p in ps), want_logprobs=any(p.logprobs for p in ps))

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepOutput:
        n = len(batch.seqs)
        if self.graphs and batch.num_decodes == n and n <= self.max_graph_bs and not any(s.is_encode for s in batch.seqs):
            return self._run_graph(batch)
        ids, pos, meta, cu = self.prepare(batch)
        encode = [i for i, s in enumerate(batch.seqs) if s.is_encode]
        layers = tuple(sorted({self._layer_index(batch.seqs[i]) for i in encode} - {self.arch.num_layers}))
        hidden, captured = self.model(ids, pos, meta, layers)
        # rows that produce a token: sequences whose known tokens are all computed after this step
        sampled = [i for i, (s, k) in enumerate(zip(batch.seqs, batch.num_new))
                   if not s.is_encode and s.num_computed_tokens + k == len(s)]
        out = StepOutput([], None, [batch.seqs[i] for i in sampled], {})
        if sampled:
            rows = torch.as_tensor(cu[1:][sampled] - 1, device=self.device)
            self._sample(self.model.compute_logits(hidden[rows]), out)
        for i in encode:
            seq, layer = batch.seqs[i], self._layer_index(batch.seqs[i])
            src = hidden if layer == self.arch.num_layers else captured[layer]
            out.hidden[seq.seq_id] = src[cu[i]:cu[i + 1]].float().cpu()
        return out

    def _sample(self, logits: torch.Tensor, out: StepOutput) -> None:
        ps = [s.params for s in out.sampled]
        if all(p.temperature == 0 and not p.logprobs for p in ps):
            out.token_ids = logits.argmax(-1).tolist()          # greedy fast path: no sampling tensors
            return
        tokens, logprobs = sample(logits, self._sampling_tensors(out.sampled))
        out.token_ids = tokens.tolist()
        out.logprobs = logprobs.tolist() if logprobs is not None else None

    def _run_graph(self, batch: ScheduledBatch) -> StepOutput:
        """Pure decode step: one packed host->device copy, one graph replay (logits included)."""
        seqs, bsz = batch.seqs, self.block_size
        n = len(seqs)
        pos = [len(s) - 1 for s in seqs]
        packed = ([s.token_ids[-1] for s in seqs] + pos
                  + [s.block_table[p // bsz] * bsz + p % bsz for s, p in zip(seqs, pos)] + [p + 1 for p in pos])
        dev = torch.tensor(packed, dtype=torch.int64).to(self.device, non_blocking=True).view(4, n)
        width = max(len(s.block_table) for s in seqs)
        table = np.zeros((n, width), dtype=np.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.block_table)] = s.block_table
        bs = next(b for b in self.graph_sizes if b >= n)
        self.g_ids[:n] = dev[0]
        self.g_pos[:n] = dev[1]
        self.g_slots[:n] = dev[2]
        self.g_ctx[:n] = dev[3]
        if bs > n:
            self.g_slots[n:bs].fill_(self.scratch_slot)
            self.g_ctx[n:bs].zero_()
        self.g_bt[:n, :width] = torch.from_numpy(table).to(self.device, non_blocking=True)
        self.graphs[bs].replay()
        out = StepOutput([], None, list(seqs), {})
        self._sample(self.g_logits[:n], out)
        return out

    def _layer_index(self, seq: Sequence) -> int:
        layer = seq.params.layer
        if layer is None:
            layer = self.cfg.hidden_states_layer
        return layer % (self.arch.num_layers + 1)

    # ------------------------------------------------------------------ CUDA graphs (decode)
    def _graph_sizes(self) -> list[int]:
        top = min(self.cfg.scheduler.max_num_seqs, 512)
        sizes = [1, 2, 4, 8] + list(range(16, top + 1, 16))
        return sorted({s for s in sizes if s <= top} | {top})

    def _capture_graphs(self) -> None:
        sizes = self._graph_sizes()
        self.max_graph_bs = mb = sizes[-1]
        dev = self.device
        self.g_ids = torch.zeros(mb, dtype=torch.int64, device=dev)
        self.g_pos = torch.zeros(mb, dtype=torch.int64, device=dev)
        self.g_slots = torch.full((mb,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.g_ctx = torch.zeros(mb, dtype=torch.int32, device=dev)
        self.g_bt = torch.zeros(mb, self.max_blocks, dtype=torch.int32, device=dev)
        self.g_cu = torch.arange(mb + 1, dtype=torch.int32, device=dev)
        self.g_logits = torch.zeros(mb, self.arch.vocab_size, dtype=self.dtype, device=dev)
        self.graph_sizes = sizes
        self.g_splits: dict[int, int] = {}
        pool = None
        with torch.inference_mode():
            for bs in reversed(sizes):
                splits = self._splits(bs, self.max_model_len)
                self.g_splits[bs] = splits
                meta = self._graph_meta(bs, splits)
                for _ in range(2):  # warm up (compiles kernels outside the capture)
                    self._graph_body(bs, meta)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._graph_body(bs, meta)
                pool = g.pool()
                self.graphs[bs] = g
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch sizes up to %d)", len(sizes), mb)

    def _graph_body(self, bs: int, meta: AttnMetadata) -> None:
        hidden = self.model(self.g_ids[:bs], self.g_pos[:bs], meta)[0]
        self.g_logits[:bs] = self.model.compute_logits(hidden)

    def _graph_meta(self, bs: int, splits: int) -> AttnMetadata:
        return AttnMetadata(slot_mapping=self.g_slots[:bs], context_lens=self.g_ctx[:bs],
                            block_tables=self.g_bt[:bs], cu_seqlens_q=self.g_cu[: bs + 1],
                            num_decodes=bs, max_query_len=1, max_context_len=self.max_model_len,
                            decode_splits=splits)
