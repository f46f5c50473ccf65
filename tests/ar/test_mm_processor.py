"""omni-ray's multimodal preprocessing equals transformers' processor classes (loaded from the same
checkpoint files): token ids with expanded placeholders, pixel values, grids, audio features, and
M-RoPE positions equal to the model's own ``get_rope_index``."""

import pytest
import torch

from omni_ray.ar.multimodal import MultiModalProcessor
from omni_ray.errors import InvalidRequestError
from omni_ray.testing import resolve_model
from tests.ar.test_mm_encoders import _image, _wave, auto_processor


@pytest.fixture(scope="module", params=["vl", "omni"])
def pair(request):
    path = resolve_model(f"tiny:qwen2.5-{request.param}")
    return request.param, MultiModalProcessor.from_pretrained(path), auto_processor(path)


def _message(kinds):
    parts = [{"type": k} for k in kinds] + [{"type": "text", "text": "What is in these? Say it twice."}]
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": parts}]


def test_equals_the_processor_class(pair):
    name, ours, ref = pair
    kinds = ["image", "audio", "image"] if name == "omni" else ["image", "image"]
    text = ref.apply_chat_template(_message(kinds), add_generation_prompt=True, tokenize=False)
    images = [_image(100, 150, 1), _image(64, 200, 2)]
    audios = [_wave(16000 * 3 + 123, 3)] if name == "omni" else None
    want = ref(text=[text], images=images, audio=audios, return_tensors="pt")
    got = ours(text, images=images, audios=audios)
    assert got.token_ids == want["input_ids"][0].tolist()
    imgs = [it for it in got.items if it.kind == "image"]
    torch.testing.assert_close(torch.cat([it.inputs["pixel_values"] for it in imgs]), want["pixel_values"])
    torch.testing.assert_close(torch.cat([it.inputs["image_grid_thw"] for it in imgs]), want["image_grid_thw"])
    if name == "omni":
        (aud,) = [it for it in got.items if it.kind == "audio"]
        torch.testing.assert_close(aud.inputs["input_features"], want["input_features"])
        torch.testing.assert_close(aud.inputs["feature_attention_mask"], want["feature_attention_mask"])
    for it in got.items:                       # each item sits on its own run of placeholder tokens
        token = ours.spec.image_token_id if it.kind == "image" else ours.spec.audio_token_id
        assert got.token_ids[it.offset:it.end] == [token] * it.length
        assert it.offset == 0 or got.token_ids[it.offset - 1] != token


def test_positions_equal_get_rope_index(pair):
    """The positions of a prompt with an image (and audio, Omni) equal the transformers model's."""
    name, ours, ref = pair
    from transformers import AutoConfig, Qwen2_5_VLModel, Qwen2_5OmniThinkerForConditionalGeneration

    kinds = ["audio", "image"] if name == "omni" else ["image"]
    text = ref.apply_chat_template(_message(kinds), add_generation_prompt=True, tokenize=False)
    images, audios = [_image(90, 120, 4)], ([_wave(16000 * 2, 5)] if name == "omni" else None)
    got = ours(text, images=images, audios=audios)
    ids, grid = torch.tensor(got.token_ids)[None], torch.cat([it.inputs["image_grid_thw"] for it in got.items
                                                              if it.kind == "image"])
    cfg = AutoConfig.from_pretrained(resolve_model(f"tiny:qwen2.5-{name}"))
    if name == "vl":
        model = Qwen2_5_VLModel._from_config(cfg)
        types = (ids == cfg.image_token_id).long()
        pos, delta = model.get_rope_index(ids, types, image_grid_thw=grid)
    else:
        model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg.thinker_config)
        lens = torch.tensor([it.length for it in got.items if it.kind == "audio"])
        pos, delta = model.get_rope_index(ids, image_grid_thw=grid, attention_mask=torch.ones_like(ids),
                                          audio_seqlens=lens)
    assert torch.equal(got.positions, pos[:, 0])
    assert got.rope_delta == int(delta.flatten()[0])


def test_same_media_same_hash_and_bad_counts(pair):
    name, ours, ref = pair
    text = ref.apply_chat_template(_message(["image"]), add_generation_prompt=True, tokenize=False)
    a = ours(text, images=[_image(80, 80, 5)])
    b = ours(text, images=[_image(80, 80, 5)])
    c = ours(text, images=[_image(80, 80, 6)])
    assert a.items[0].hash == b.items[0].hash != c.items[0].hash
    with pytest.raises(InvalidRequestError, match="1 image placeholder.*for 2 image"):
        ours(text, images=[_image(80, 80, 5)] * 2)
    if name == "vl":
        with pytest.raises(InvalidRequestError, match="does not take audio"):
            ours(text, images=[_image(80, 80, 5)], audios=[_wave(1600, 1)])
