"""Token text and true bytes for logprobs (omni_ray/ar/engine/token_bytes.py)."""

from transformers import AutoTokenizer

from omni_ray.ar.engine.token_bytes import text_offsets, token_table, token_text
from omni_ray.testing import resolve_model

TEXT = "héllo — 日本語 ok"


def test_byte_level_tokens_give_their_true_bytes_and_text():
    tok = AutoTokenizer.from_pretrained(str(resolve_model("tiny:qwen3")))
    table = token_table(tok)
    assert token_table(tok) is table                            # built once per tokenizer
    ids = tok.encode(TEXT)
    pieces = tok.convert_ids_to_tokens(ids)
    assert "Ġo" in pieces and "Ã" in pieces                     # the raw BPE strings are not text ...
    assert b"".join(table.bytes(i) for i in ids).decode("utf-8") == TEXT      # ... their bytes are
    texts = [table.text(i) for i in ids]
    assert " o" in texts and "Ġo" not in texts
    # "é" is split over two tokens: each keeps its own byte and says so in its text
    e = [i for i in ids if table.bytes(i) in (b"\xc3", b"\xa9")]
    assert [table.text(i) for i in e] == ["bytes:\\xc3", "bytes:\\xa9"]
    entry = table.entry(e[0], -1.5)
    assert entry == {"id": e[0], "token": "bytes:\\xc3", "logprob": -1.5, "bytes": [0xC3]}
    # special tokens: their content
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert table.text(im_end) == "<|im_end|>" and table.bytes(im_end) == b"<|im_end|>"


def test_token_text_and_offsets():
    assert token_text(" fill".encode()) == " fill"
    assert token_text(b"\xe2\x80") == "bytes:\\xe2\\x80"
    assert token_text(b"a\xe2") == "bytes:a\\xe2"
    # "a—b" as a, [e2 80], [94], b: the split character starts where its first byte's token does
    assert text_offsets([b"a", b"\xe2\x80", b"\x94", b"b"], 10) == [10, 11, 11, 12]


def test_sentencepiece_pieces():
    class SP:                        # a SentencePiece-style tokenizer's pieces (byte fallback, "▁" for spaces)
        backend_tokenizer = type("B", (), {"decoder": "Sequence([Replace('▁', ' '), ByteFallback(), Fuse()])"})()
        added_tokens_decoder = {}
        vocab_size = 4

        def __len__(self):
            return 4

        def convert_ids_to_tokens(self, ids):
            return ["▁fill", "<0xE2>", "<0x80>", "ing"]

    table = token_table(SP())
    assert [table.bytes(i) for i in range(4)] == [b" fill", b"\xe2", b"\x80", b"ing"]
    assert [table.text(i) for i in range(4)] == [" fill", "bytes:\\xe2", "bytes:\\x80", "ing"]
