"""Images and audio through the AR engine (LLM): greedy continuations equal transformers' generate
on the same processed inputs, also with chunked prefill splitting a prompt inside an image, batched
with text-only requests, through the prefix cache (which keys blocks by media content) and the
encoder cache (the same image encoded once)."""

import pytest
import torch

from omni_ray.ar import SamplingParams
from omni_ray.errors import InvalidRequestError
from tests.ar.conftest import PROMPTS, make_llm
from tests.ar.test_mm_encoders import _image, _wave
from tests.ar.test_mm_language_model import omni, vl  # noqa: F401  (fixtures)

N_NEW = 6
GREEDY = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)


def _text(m, kinds, words="Describe it."):
    parts = [{"type": k} for k in kinds] + [{"type": "text", "text": words}]
    return m["proc"].apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                         tokenize=False)


def _hf_greedy(m, text, images=None, audios=None, thinker=False):
    inputs = m["proc"](text=[text], images=images, audio=audios, return_tensors="pt")
    model = m["hf"].thinker if thinker else m["hf"]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("budget", [4096, 24])       # 24: prefill chunks cut inside the image's placeholders
def test_vl_image_prompts_equal_transformers(vl, budget):  # noqa: F811
    llm = make_llm("tiny:qwen2.5-vl", max_num_batched_tokens=budget, enable_prefix_caching=False)
    img_a, img_b = _image(100, 150, 1), _image(64, 90, 2)
    prompts = [{"prompt": _text(vl, ["image"]), "multi_modal_data": {"image": img_a}},
               PROMPTS[0],                                        # text-only in the same batch
               {"prompt": _text(vl, ["image", "image"], "Compare."), "multi_modal_data": {"image": [img_a, img_b]}}]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert outs[0]["token_ids"] == _hf_greedy(vl, prompts[0]["prompt"], [img_a])
    assert outs[2]["token_ids"] == _hf_greedy(vl, prompts[2]["prompt"], [img_a, img_b])
    text_ref = make_llm("tiny:qwen2.5-vl").generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]
    assert outs[1]["token_ids"] == text_ref["token_ids"]


@pytest.mark.parametrize("kinds", [["image", "audio"], ["audio"]])
def test_omni_thinker_image_and_audio_equal_transformers(omni, kinds):  # noqa: F811
    from transformers import GenerationConfig

    llm = make_llm("tiny:qwen2.5-omni", max_num_batched_tokens=40)
    img, wave = _image(90, 120, 3), _wave(16000 * 2 + 321, 4)
    text = _text(omni, kinds)
    data = {"audio": (wave, 16000)} | ({"image": img} if "image" in kinds else {})
    got = llm.generate([{"prompt": text, "multi_modal_data": data}, PROMPTS[2]], GREEDY, use_tqdm=False)[0]
    omni["hf"].thinker.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=0)
    assert got["token_ids"] == _hf_greedy(omni, text, [img] if "image" in kinds else None, [wave], thinker=True)


def test_chat_with_openai_content_parts(vl):  # noqa: F811
    """llm.chat with an image_url data: URL equals the same prompt given as multi_modal_data."""
    import base64
    import io

    llm = make_llm("tiny:qwen2.5-vl")
    img = _image(80, 100, 9)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe it."}]}]
    chat = llm.chat(msgs, GREEDY, use_tqdm=False)[0]
    same = llm.generate([{"prompt": _text(vl, ["image"]), "multi_modal_data": {"image": img}}], GREEDY,
                        use_tqdm=False)[0]
    assert chat["token_ids"] == same["token_ids"] == _hf_greedy(vl, _text(vl, ["image"]), [img])
    with pytest.raises(InvalidRequestError, match="does not fetch URLs"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    with pytest.raises(InvalidRequestError, match="does not take audio"):
        llm.chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA",
                                                                                      "format": "wav"}}]}])


def test_caches_key_on_media_content(vl):  # noqa: F811
    """A second question about the same image reuses its KV blocks and its encoder output; the same
    prompt with another image reuses neither (the placeholders are equal, the content is not)."""
    llm = make_llm("tiny:qwen2.5-vl", enable_prefix_caching=True, kvcache_block_size=16)
    enc = llm.runner.encoders
    img, other = _image(100, 150, 1), _image(100, 150, 2)
    p = lambda im, q: {"prompt": _text(vl, ["image"], q), "multi_modal_data": {"image": im}}  # noqa: E731
    first = llm.generate([p(img, "What is it?")], GREEDY, use_tqdm=False)[0]
    hits0, encoded0 = llm.block_manager.prefix_hits, enc.encoded_items
    again = llm.generate([p(img, "What colour is it?")], GREEDY, use_tqdm=False)[0]
    assert llm.block_manager.prefix_hits > hits0                    # blocks up to the question reused
    assert again["token_ids"] == _hf_greedy(vl, _text(vl, ["image"], "What colour is it?"), [img])
    hits1 = llm.block_manager.prefix_hits
    swapped = llm.generate([p(other, "What is it?")], GREEDY, use_tqdm=False)[0]
    hits_other = llm.block_manager.prefix_hits - hits1
    assert swapped["token_ids"] == _hf_greedy(vl, _text(vl, ["image"], "What is it?"), [other])
    assert hits_other < 16 * 2                                      # at most the blocks before the image
    assert first["token_ids"] != swapped["token_ids"] or hits_other < hits1 - hits0
    # encoder cache: with the prefix cache off, the same image in two requests is encoded once
    llm2 = make_llm("tiny:qwen2.5-vl", enable_prefix_caching=False)
    llm2.generate([p(img, "One?"), p(img, "Two?")], GREEDY, use_tqdm=False)
    assert llm2.runner.encoders.encoded_items == 1
    assert encoded0 == 1 and enc.encoded_items == 2


def test_bad_media_fails_alone(vl):  # noqa: F811
    llm = make_llm("tiny:qwen2.5-vl")
    with pytest.raises(InvalidRequestError, match="1 image placeholder"):
        llm.generate([{"prompt": _text(vl, ["image"]), "multi_modal_data": {"image": [_image(50, 50, 1)] * 2}}])
    text_llm = make_llm("tiny:qwen3")
    with pytest.raises(InvalidRequestError, match="takes text only"):
        text_llm.generate([{"prompt": "hi", "multi_modal_data": {"image": _image(50, 50, 1)}}])
    assert llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)[0]["token_ids"]   # the engine still serves
