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


def decode_window(dec, ids: list[int], prefix: int, read: int, skip_special: bool) -> tuple[str, int, int]:
    """One incremental step over ``ids``: (new text, prefix, read offsets for the next step).
    ids[prefix:read] were decoded already (kept as context, so that spaces and characters split
    across tokens come out right); no text while the tail is an incomplete character."""
    if read >= len(ids):
        return "", prefix, read
    before = dec.decode(ids[prefix:read], skip_special_tokens=skip_special)
    # several new tokens whose last character is incomplete: the text up to the last token that
    # completes one goes out now (a character spans at most 4 byte tokens), the rest waits
    for end in range(len(ids), max(read, len(ids) - 4), -1):
        full = dec.decode(ids[prefix:end], skip_special_tokens=skip_special)
        if len(full) > len(before) and not full.endswith("\ufffd"):
            return full[len(before):], read, end
    return "", prefix, read


def update_text(seq: Sequence, tokenizer, skip_special: bool) -> None:
    """Extend ``seq.output_text`` with the text of the tokens generated since the last call (one
    token or several: the window decodes them together)."""
    text, seq.prefix_offset, seq.read_offset = decode_window(_decoder(tokenizer), seq.token_ids, seq.prefix_offset,
                                                             seq.read_offset, skip_special)
    seq.output_text += text


class StreamText:
    """Incremental text of one stream from its token ids alone (AsyncLLM's side of a stream: the
    engine core then only steps). Starts from the last prompt tokens (``context``), as
    ``Sequence`` does; keeps only the window it still needs."""

    __slots__ = ("dec", "ids", "prefix", "read", "skip")

    def __init__(self, tokenizer, skip_special: bool):
        self.dec, self.skip = _decoder(tokenizer), skip_special
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def feed(self, context: list[int] | None, new_ids: list[int], final: bool = False) -> str:
        """The text ``new_ids`` add; ``final`` (the stream's last ids): also a character left
        incomplete at the end (as "\ufffd", as the whole text's decode has it)."""
        if context is not None:
            self.ids, self.prefix, self.read = list(context), 0, len(context)
        self.ids += new_ids
        if final:
            before = self.dec.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
            rest = self.dec.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)[len(before):]
            self.ids, self.prefix, self.read = [], 0, 0
            return rest
        text, self.prefix, self.read = decode_window(self.dec, self.ids, self.prefix, self.read, self.skip)
        if self.prefix:
            del self.ids[:self.prefix]
            self.read -= self.prefix
            self.prefix = 0
        return text


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
