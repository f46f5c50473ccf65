"""Incremental detokenization and stop strings.

Decoding only a short window of recent tokens per step keeps streaming O(1) per token while
multi-byte characters split across tokens come out whole.
"""

from __future__ import annotations

from omni_ray.ar.sequence import Sequence


def _decoder(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` behind a fast HF tokenizer (a third of the per-call cost),
    where HF's decode adds nothing on top (no clean-up of tokenization spaces); else the tokenizer."""
    raw = getattr(tokenizer, "_tokenizer", None)
    if raw is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return raw
    return tokenizer


def update_text(seq: Sequence, tokenizer, skip_special: bool) -> None:
    """Extend ``seq.output_text`` with the text of the tokens generated since the last call (one
    token or several: the window decodes them together)."""
    ids = seq.token_ids
    if seq.read_offset >= len(ids):
        return
    dec = _decoder(tokenizer)
    prefix = dec.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip_special)
    full = dec.decode(ids[seq.prefix_offset:], skip_special_tokens=skip_special)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        seq.output_text += full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)


def find_stop(seq: Sequence, stops: list[str], new_chars: int) -> int:
    """Index in output_text where a stop string starts, or -1 (searching only new text)."""
    text = seq.output_text
    best = -1
    for s in stops:
        i = text.find(s, max(0, len(text) - new_chars - len(s) + 1))
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def stream_safe_len(seq: Sequence, stops: list[str] | None) -> int:
    """How much of output_text can be streamed: hold back a tail that may begin a stop string."""
    text = seq.output_text
    if not stops or seq.is_finished:
        return len(text)
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold
