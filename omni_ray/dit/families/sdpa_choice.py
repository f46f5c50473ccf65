"""Which of torch's SDPA kernels runs a DiT family's attention (Wan, Qwen-Image): measured on the GPU, not
assumed.

Video attention is where a Wan step's time goes (14 k tokens at 480p x 33 frames, 33 k at 81 frames);
Qwen-Image's joint attention runs under an additive caption mask whenever a batch holds captions of
different lengths. torch ships several fused kernels for ``scaled_dot_product_attention``
(FlashAttention-2, cuDNN's fused attention, memory-efficient attention) and its default pick is not
always the fastest on a given GPU and shape: flash takes no mask, so a masked call falls to the
memory-efficient kernel (on an H100, 16 rows x 1,152 tokens with a caption mask: efficient 129 TFLOP/s,
cuDNN 398; unmasked: flash 356, cuDNN 660). ``SdpaChoice`` times each candidate once per (token count,
masked) on the model's own self-attention shape ``[rows, heads, N, head_dim]`` (a few ms, the first time
a shape is seen) and runs the blocks under ``sdpa_kernel`` with the fastest first (the others stay
behind it as fallbacks for shapes it cannot take, such as Wan's 512-key cross-attention).
``attention_backend`` in the engine config forces one (``"default"``: torch's own order). A family whose
mask covers only a key prefix (Qwen-Image's caption) also has ``"split"`` timed on masked shapes: the
unmasked call over the other keys and a masked one over the prefix, merged by log-sum-exp
(``split_attention.py``), and ``"ragged"``: the sequence laid out with the masked keys last and attended as
variable-length segments without a mask (``ragged_attention.py``; picked only if it also matches the masked call).
``benchmarks/bench_wan.py`` prints the same measurement.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
CANDIDATES = ("flash", "cudnn", "efficient")


@torch.no_grad()
def time_backends(rows: int, heads: int, tokens: int, head_dim: int, dtype=torch.bfloat16, device="cuda",
                  names=CANDIDATES, reps: int = 5, masked: bool = False, prefix: int | None = None,
                  split=None, ragged=None) -> dict[str, float]:
    """Milliseconds per self-attention call for each backend that takes the shape (others: inf); ``masked``:
    under an additive key mask [rows, 1, 1, N] (a caption's padded keys at -inf: the last quarter of the
    ``prefix`` keys, else the first N / 16); ``split``: also time ``split(q, k, v, bias [rows, 1, prefix],
    prefix)`` as ``"split"`` (masked shapes with a prefix only); ``ragged``: ``ragged(q, k, v, bias, prefix)`` over
    the same keys with the prefix moved last, as ``"ragged"`` (inf unless it matches the masked call)."""
    q, k, v = (torch.randn(rows, heads, tokens, head_dim, dtype=dtype, device=device) for _ in range(3))
    out: dict[str, float] = {}
    mask = None
    if masked:
        mask = torch.zeros(rows, 1, 1, tokens, dtype=dtype, device=device)
        if prefix:
            mask[..., prefix - max(1, prefix // 4):prefix] = float("-inf")
        else:
            mask[..., :max(1, tokens // 16)] = float("-inf")
    calls = {name: (BACKENDS[name], lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
             for name in names}
    if masked and prefix and split is not None:
        bias = mask[:, 0, :, :prefix]                                                    # [rows, 1, prefix]
        calls["split"] = (BACKENDS["cudnn"], lambda: split(q, k, v, bias, prefix))
    if masked and prefix and ragged is not None:
        bias = mask[:, 0, :, :prefix]
        last = [torch.cat([t[:, :, prefix:], t[:, :, :prefix]], 2).transpose(1, 2).contiguous().transpose(1, 2)
                for t in (q, k, v)]                     # [image | text], token-major as the q / k / v kernel writes it
        if not _matches(ragged, last, bias, prefix):
            out["ragged"] = float("inf")
        else:
            calls["ragged"] = (BACKENDS["cudnn"], lambda: ragged(*last, bias, prefix))
    for name, (backend, call) in calls.items():
        try:
            with sdpa_kernel(backend):
                for _ in range(2):
                    call()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    call()
                end.record()
                end.synchronize()
            out[name] = start.elapsed_time(end) / reps
        except RuntimeError:                  # this backend cannot take the shape / dtype / GPU
            out[name] = float("inf")
    return out


def _matches(ragged, qkv: list[torch.Tensor], bias: torch.Tensor, prefix: int) -> bool:
    """Whether ``ragged`` gives the masked call's output on the real tokens, within bf16's rounding (a backend
    that runs but is wrong, or cannot take the call, is never picked)."""
    from omni_ray.dit.families.ragged_attention import masked_reference

    try:
        got = ragged(*qkv, bias, prefix)
    except (RuntimeError, AttributeError, NotImplementedError):      # no ragged cuDNN kernel in this torch / GPU
        return False
    ref = masked_reference(*qkv, bias, prefix)
    n = qkv[0].shape[2] - prefix
    real = torch.cat([torch.ones_like(bias[:, 0, :1].expand(-1, n), dtype=torch.bool), bias[:, 0] == 0], 1)
    diff = (got - ref).abs().transpose(1, 2)[real]                                   # [real tokens, H, d]
    return bool(torch.isfinite(got.transpose(1, 2)[real]).all()) and float(diff.max()) <= 0.02 * max(
        1.0, float(ref.abs().max()))


def timed_rows(rows: int, tokens: int) -> int:
    """Rows of the timing call: the batch's own up to ~64 k query tokens in all (its q / k / v stay ~1 GB).
    Rankings move with the rows: the split attention's merge loses at 2 rows of 1,152 tokens and wins at 16
    (``docs/benchmarks.md``)."""
    return max(1, min(rows, (1 << 16) // tokens))


class SdpaChoice:
    """The SDPA backend order for a family's blocks, per self-attention token count (and whether a mask is
    applied)."""

    def __init__(self, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype, mode: str = "auto",
                 split=None, ragged=None):
        self.heads, self.head_dim, self.device, self.dtype, self.mode = heads, head_dim, device, dtype, mode
        self.split = split                                 # the family's split attention, timed as "split"
        self.ragged = ragged                               # its ragged attention, timed as "ragged"
        self.picked: dict[tuple[int, bool], str] = {}      # (tokens, masked) -> backend name
        self.timings: dict[tuple[int, bool], dict[str, float]] = {}

    def prepare(self, rows: int, tokens: int, masked: bool = False, prefix: int | None = None) -> None:
        """Measure for this token count if not yet (call outside CUDA graph capture); ``prefix``: the mask
        covers only the first ``prefix`` keys (times ``"split"`` too, where the family has one)."""
        key = (tokens, masked)
        if self.mode != "auto" or self.device.type != "cuda" or key in self.picked:
            return
        ms = time_backends(timed_rows(rows, tokens), self.heads, tokens, self.head_dim, self.dtype, self.device,
                           masked=masked, prefix=prefix, split=self.split, ragged=self.ragged)
        best = min(ms, key=ms.get)
        self.picked[key], self.timings[key] = best, ms
        log.info("SDPA for %d tokens x %d heads%s: %s (%s)", tokens, self.heads, " (masked)" if masked else "",
                 best, ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))

    def first(self, tokens: int, masked: bool = False) -> str | None:
        """The backend to try first: the forced one, the one measured for this shape, else the one measured
        for the nearest token count under the same masking (a CUDA graph's caption bucket pads the text
        past the length measured before the capture); None: torch's own order."""
        if self.mode != "auto":
            return None if self.mode == "default" else self.mode
        if (tokens, masked) in self.picked:
            return self.picked[(tokens, masked)]
        near = [n for n, m in self.picked if m == masked]
        return self.picked[(min(near, key=lambda n: abs(n - tokens)), masked)] if near else None

    def splits(self, tokens: int, masked: bool) -> bool:
        """Whether the family runs its split attention for this shape."""
        return self.runs("split", tokens, masked)

    def runs(self, name: str, tokens: int, masked: bool) -> bool:
        """Whether the family runs its own attention ``name`` ("split", "ragged") for this (masked) shape."""
        return masked and getattr(self, name) is not None and self.first(tokens, masked) == name

    def context(self, tokens: int, masked: bool = False):
        if self.device.type != "cuda" or self.mode == "default":
            return contextlib.nullcontext()
        first = self.first(tokens, masked)
        if first is None:
            return contextlib.nullcontext()
        first = "cudnn" if first in ("split", "ragged") else first     # the family's own calls: cuDNN's kernels
        order = [BACKENDS[first]] + [BACKENDS[n] for n in (*CANDIDATES, "math") if n != first]
        return sdpa_kernel(order, set_priority=True)
