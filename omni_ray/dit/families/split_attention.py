"""Joint attention under a caption mask as two pieces merged by their log-sum-exp.

Qwen-Image attends over [text | image] keys; a batch of captions of different lengths pads the text
and masks the padded keys. A mask costs the whole call: on an H100, cuDNN's kernel over 16 rows x
4,224 tokens runs at ~420 TFLOP/s masked against ~660 unmasked (``docs/benchmarks.md``), and flash
takes no mask at all. Only the text keys are ever masked, so the call splits exactly:

    softmax over [text | image] keys = the image keys' softmax (unmasked: the fast kernel, no mask)
                                       and the text keys' (masked, but only T keys: a few % of the work)
    out = o_img * exp(lse_img - lse) + o_txt * exp(lse_txt - lse),   lse = logaddexp(lse_img, lse_txt)

the standard merge of attention over disjoint key sets (as FlashAttention's split-KV decoding and ring
attention merge their partial results). ``SdpaChoice`` times this against the single masked call and
picks it only where it is faster (``"split"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp: q [B, H, S, d], k / v [B, H, K, d], bias additive, broadcastable to
    [B, H, S, K] -> (out [B, H, S, d] in q's dtype, lse [B, H, S] fp32; -inf where every key is masked)."""
    if q.is_cuda:
        if bias is not None:
            bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True)[:2]
        return out, lse.view(q.shape[:3])
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5       # [B, H, S, K]
    if bias is not None:
        logits = logits + bias.float()
    lse = torch.logsumexp(logits, dim=-1)                                                       # [B, H, S]
    p = torch.exp(logits - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    return torch.matmul(p, v.float()).to(q.dtype), lse


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """The attention over both key sets from each set's (out, lse); a set with no unmasked key (lse -inf)
    adds nothing, whatever its out holds."""
    dtype = o1.dtype
    lse = torch.logaddexp(lse1, lse2)
    w1, w2 = torch.exp(lse1 - lse)[..., None], torch.exp(lse2 - lse)[..., None]
    o1 = torch.where(torch.isfinite(lse1)[..., None], o1.float(), 0.0)
    o2 = torch.where(torch.isfinite(lse2)[..., None], o2.float(), 0.0)
    return (o1 * w1 + o2 * w2).to(dtype)


def split_caption_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_bias: torch.Tensor,
                            text_len: int, merge_fn=merge) -> torch.Tensor:
    """Equal to ``F.scaled_dot_product_attention(q, k, v, attn_mask=F.pad(text_bias, (0, N))[:, None])``:
    q / k / v [B, H, T + N, d] over [text | image], ``text_bias`` [B, 1, T] additive over the text keys
    (0 or -inf), T = ``text_len`` -> [B, H, T + N, d]."""
    T = text_len
    o_img, lse_img = attention_lse(q, k[:, :, T:], v[:, :, T:])                   # no mask: the fast kernel
    o_txt, lse_txt = attention_lse(q, k[:, :, :T], v[:, :, :T], text_bias[:, None])    # [B, 1, 1, T]
    return merge_fn(o_img, lse_img, o_txt, lse_txt)


def masked_reference(q, k, v, text_bias, text_len):
    """The single masked call ``split_caption_attention`` replaces (tests, timing)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=F.pad(text_bias, (0, q.shape[2] - text_len))[:, None])
