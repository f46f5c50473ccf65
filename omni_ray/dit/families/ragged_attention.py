"""Joint attention under a caption mask as variable-length (ragged) attention: no mask at all.

Qwen-Image pads a batch's captions to one length and masks the padded keys; any mask costs cuDNN's kernel
a third of its speed (16 rows x 4,224 tokens on an H100: ~440 TFLOP/s masked, ~660 unmasked;
``split_attention.py`` gets to ~590). With the joint sequence laid out [image | text] instead of
[text | image], each row's real tokens are one contiguous run and its padded caption positions the run
after it, so the batch is a packed sequence of 2B segments, attended without a mask:

    row b:  [ image (N) | caption (L_b) | padding (T - L_b) ]   ->   segments  (N + L_b), (T - L_b)

The padded positions attend only to each other (their outputs are never read: the caption stream runs on
the real tokens, and a padded key never reaches a real query), so the image and caption outputs equal the
masked call's. On CUDA this is cuDNN's ragged attention (``aten._cudnn_attention_forward`` with cumulative
sequence lengths, token-major q / k / v, fp16 / bf16); elsewhere the same segments as a block-diagonal mask.
``SdpaChoice`` times it as ``"ragged"`` on masked shapes and runs it only where it is faster (and equal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_segments(text_bias: torch.Tensor, image_len: int) -> torch.Tensor:
    """Cumulative segment lengths [2B + 1] int32 of the [image | text] layout: per row its image and real
    caption tokens, then its padded positions; ``text_bias`` [B, 1, T] (or [B, T]) additive, 0 on the real
    tokens, which come first (a caption mask's padding is at its end)."""
    B, T = text_bias.shape[0], text_bias.shape[-1]
    real = (text_bias.reshape(B, T) == 0).sum(-1)                                      # [B]
    lens = torch.stack([image_len + real, T - real], dim=1).reshape(-1)                # [2B]
    return F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """Attention within each segment of the flattened rows: q / k / v [B, H, S, d] (on CUDA views of
    token-major [B, S, H, d] memory), ``cum`` [n + 1] int32 segment bounds over the B * S tokens ->
    [B, H, S, d]. cuDNN's kernel in fp16 / bf16 on CUDA; otherwise (and in fp32) a block-diagonal mask."""
    B, H, S, d = q.shape
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        flat = [t.transpose(1, 2).reshape(B * S, H, d) for t in (q, k, v)]               # [B * S, H, d]
        out = torch.ops.aten._cudnn_attention_forward(*flat, None, cum, cum, S, S, False)[0]
        return out.view(B, S, H, d).transpose(1, 2)
    seg = torch.bucketize(torch.arange(B * S, device=q.device), cum[1:].long(), right=True).view(B, 1, S)
    mask = seg[:, :, :, None] == seg[:, :, None, :]                                    # [B, 1, S, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def ragged_caption_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_bias: torch.Tensor,
                             text_len: int) -> torch.Tensor:
    """Equal to ``F.scaled_dot_product_attention(q, k, v, attn_mask=F.pad(text_bias, (N, 0))[:, None])`` on
    every real token: q / k / v [B, H, N + T, d] over [image | text], ``text_bias`` [B, 1, T] additive over
    the text keys (0, then -inf on the padding), T = ``text_len`` -> [B, H, N + T, d]."""
    return ragged_attention(q, k, v, caption_segments(text_bias, q.shape[2] - text_len))


def masked_reference(q, k, v, text_bias, text_len):
    """The single masked call over [image | text] that ``ragged_caption_attention`` replaces (tests, timing)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=F.pad(text_bias, (q.shape[2] - text_len, 0))[:, None])
