"""Each token's own bytes and text, as OpenAI's and vLLM's logprobs report them.

``convert_ids_to_tokens`` gives a tokenizer's internal strings ("Ġfill" in byte-level BPE, "▁fill"
or "<0xE2>" in SentencePiece), not text; ``decode([id])`` turns a token that holds part of a UTF-8
character into "\\ufffd" and loses its bytes. ``token_table(tokenizer)`` builds, once per tokenizer,
every token's true bytes (byte-level BPE: the GPT-2 byte-to-unicode map inverted; SentencePiece:
"▁" is a space and ``<0xNN>`` the byte NN; added / special tokens: their content) and its text: the
bytes decoded, or, for a token that is not whole UTF-8 (it ends or starts inside a character),
"bytes:" and the bytes escaped (``"bytes:\\xe2\\x80"``), vLLM's convention.

    table = token_table(tokenizer)
    table.text(id), table.bytes(id)        # " fill", b" fill"
"""

from __future__ import annotations

import codecs
import weakref
from functools import lru_cache

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` (byte-level BPE's printable stand-ins for bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_text(raw: bytes) -> str:
    """A token's text from its bytes: decoded when they are whole UTF-8, else ``"bytes:"`` + the
    bytes with the undecodable ones escaped (``b"\\xe2\\x80"`` -> ``"bytes:\\xe2\\x80"``)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + raw.decode("utf-8", "backslashreplace")


def _kind(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = str(getattr(backend, "decoder", None) or "")
    if "ByteLevel" in decoder:
        return "byte_level"
    if "ByteFallback" in decoder or "▁" in decoder:
        return "sentencepiece"
    return "decode"


class TokenTable:
    """Every token's bytes (``bytes(id)``) and text (``text(id)``) for one tokenizer."""

    def __init__(self, tokenizer):
        n = max(len(tokenizer), getattr(tokenizer, "vocab_size", 0) or 0)
        pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
        added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        kind = _kind(tokenizer)
        inv = _unicode_to_byte()
        self._bytes: list[bytes] = []
        for i, piece in enumerate(pieces):
            if piece is None:
                raw = b""
            elif i in added:
                raw = added[i].encode("utf-8")
            elif kind == "byte_level" and all(c in inv for c in piece):
                raw = bytes(inv[c] for c in piece)
            elif kind == "sentencepiece":
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    raw = bytes([int(piece[3:5], 16)])
                else:
                    raw = piece.replace("▁", " ").encode("utf-8")
            else:
                raw = tokenizer.decode([i]).encode("utf-8")
            self._bytes.append(raw)
        self._text = [token_text(b) for b in self._bytes]

    def __len__(self) -> int:
        return len(self._bytes)

    def bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def text(self, token_id: int) -> str:
        return self._text[token_id] if 0 <= token_id < len(self._text) else ""

    def entry(self, token_id: int, logprob: float) -> dict:
        """OpenAI's ``{"token", "logprob", "bytes"}`` for one token (``id`` added, for handle callers)."""
        return {"id": token_id, "token": self.text(token_id), "logprob": logprob,
                "bytes": list(self.bytes(token_id))}


def token_table(tokenizer) -> TokenTable:
    """The tokenizer's table, built on first use and kept as long as the tokenizer lives."""
    try:
        table = _TABLES.get(tokenizer)
    except TypeError:                     # not weak-referenceable: no cache
        return TokenTable(tokenizer)
    if table is None:
        table = _TABLES[tokenizer] = TokenTable(tokenizer)
    return table


def text_offsets(chunks: list[bytes], start: int = 0) -> list[int]:
    """Completions' ``text_offset``: where each token starts in the text, counting the characters
    that the bytes before it complete (a token that ends inside a character starts the next one
    at that character)."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    out, pos = [], start
    for raw in chunks:
        out.append(pos)
        pos += len(dec.decode(raw))
    return out
