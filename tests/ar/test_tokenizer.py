"""The locally trained tokenizer, padded to a real model's vocabulary (shape checkpoints)."""

from transformers import AutoTokenizer

from omni_ray.models.tokenizer import save_tokenizer

TEXT = "Write a short story about a lighthouse keeper."


def test_filled_vocabulary_decodes_every_id_and_encodes_as_before(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "full").mkdir()
    save_tokenizer(tmp_path / "plain")
    special = save_tokenizer(tmp_path / "full", fill_to=5000)
    plain = AutoTokenizer.from_pretrained(str(tmp_path / "plain"))
    full = AutoTokenizer.from_pretrained(str(tmp_path / "full"))
    assert special["vocab_len"] == len(full) == 5000 and len(plain) < 5000
    assert full(TEXT).input_ids == plain(TEXT).input_ids                 # fillers are never merged into
    assert plain.decode([len(plain) + 10]) == ""                         # unpadded: an id past it is lost
    words = [full.decode([i]) for i in range(len(plain), 5000)]
    assert all(w.startswith(" w") and len(w) > 2 for w in words)
    assert len(set(words)) == len(words)
    assert full.decode(plain(TEXT).input_ids) == TEXT
