"""The locally trained tokenizer, padded to a real model's vocabulary (shape checkpoints)."""

from transformers import AutoTokenizer

from omni_ray.testing.tokenizer import save_tokenizer

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


def test_stream_text_from_ids_equals_the_engines_text(tmp_path):
    """AsyncLLM decodes stream text from token ids (StreamText), fed one token or several at a time
    after the prompt's tail: the same text as the engine's own incremental decode and as one
    decode of all output ids, characters split across byte tokens included."""
    from omni_ray.ar.engine.detokenizer import StreamText, update_text
    from omni_ray.ar.sampling_params import SamplingParams
    from omni_ray.ar.sequence import Sequence

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    prompt = tok("Once upon a time").input_ids
    out = tok(" the keeper wrote: héllo wörld, 你好 🦊 — done.").input_ids
    assert any(tok.decode([i]).endswith("\ufffd") for i in out)          # some tokens are partial characters
    for chunk in (1, 3):
        seq = Sequence(list(prompt), SamplingParams(), block_size=16)
        st = StreamText(tok, skip_special=True)
        got, context = [], seq.token_ids[seq.prefix_offset:seq.read_offset]
        for i in range(0, len(out), chunk):
            for t in out[i:i + chunk]:
                seq.append_token(t)
            update_text(seq, tok, True)
            got.append(st.feed(context, out[i:i + chunk]))
            context = None
        assert "".join(got) == seq.output_text == tok.decode(out, skip_special_tokens=True)
        assert len(st.ids) <= 2 * chunk + 8                                  # only the window is kept


def test_a_chunk_ending_inside_a_character_gives_the_text_before_it(tmp_path):
    """A paced stream's merged output can end in the middle of a multi-byte character: its text
    up to the last whole character goes out then (as the engine's per-token decode has it at that
    point), not held back whole; the rest follows with the next chunk."""
    from omni_ray.ar.engine.detokenizer import StreamText, update_text
    from omni_ray.ar.sampling_params import SamplingParams
    from omni_ray.ar.sequence import Sequence

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    prompt = tok("Once upon a time").input_ids
    out = tok(" the keeper wrote: héllo wörld, 你好 🦊 — and 🐟🐟 done.").input_ids
    for chunk in (2, 5, 7):
        seq = Sequence(list(prompt), SamplingParams(), block_size=16)
        st = StreamText(tok, skip_special=True)
        got, context, cut_inside = [], seq.token_ids[seq.prefix_offset:seq.read_offset], 0
        for i in range(0, len(out), chunk):
            for t in out[i:i + chunk]:
                seq.append_token(t)
                update_text(seq, tok, True)                                  # the engine: one token at a time
            got.append(st.feed(context, out[i:i + chunk]))
            context = None
            cut_inside += tok.decode(out[:i + chunk]).endswith("\ufffd")
            assert "".join(got) == seq.output_text                          # nothing held back but the cut
        assert cut_inside > 0                                                # some chunks did end inside one
        assert "".join(got) == tok.decode(out, skip_special_tokens=True)


def test_a_batch_of_plain_prompts_is_tokenized_in_one_call_as_one_by_one(tmp_path):
    """``pretokenize`` (a batched stage call's prompts): the same ids as ``prompt_ids`` of each
    request; chat requests, system-prompted and token-id prompts are left as they are (an empty
    prompt cannot even be a request)."""
    import pytest

    from omni_ray.errors import InvalidRequestError
    from omni_ray.stages import ARRequest
    from omni_ray.stages.ar import pretokenize, prompt_ids

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        ARRequest("e", prompt="")
    reqs = [ARRequest("a", prompt=TEXT), ARRequest("b", prompt="a café at dusk, naïve"),
            ARRequest("c", prompt=[5, 6, 7]), ARRequest("d", prompt="hi", system_prompt="be brief"),
            ARRequest("e", messages=[{"role": "user", "content": "x"}]), ARRequest("f", prompt=TEXT + " " + TEXT),
            ARRequest("g", prompt=TEXT, echo=True)]                # echo: the prompt is returned as sent
    out = pretokenize(tok, reqs)
    assert [type(r.prompt) for r in out] == [list, list, list, str, type(None), list, str]
    assert [r.request_id for r in out] == list("abcdefg")
    for r, o in zip(reqs, out):
        assert prompt_ids(tok, o) == prompt_ids(tok, r)
    assert reqs[0].prompt == TEXT                                     # the caller's requests are not changed


def test_a_stream_that_ends_inside_a_character_ends_as_the_whole_text(tmp_path):
    """A stream cut by max_tokens inside a multi-byte character: its last text (``final``) carries
    the incomplete character as the whole text's decode does ("\\ufffd"), so that the stream's text
    equals the offline engine's."""
    from omni_ray.ar.engine.detokenizer import StreamText

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    out = tok(" fox 🦊 done").input_ids
    cut = next(k for k in range(1, len(out)) if tok.decode(out[:k]).endswith("\ufffd"))
    st = StreamText(tok, skip_special=True)
    got = [st.feed(tok("Once").input_ids, out[:1])] + [st.feed(None, [t]) for t in out[1:cut - 1]]
    got.append(st.feed(None, out[cut - 1:cut], final=True))
    assert "".join(got) == tok.decode(out[:cut]) and got[-1].endswith("\ufffd")
