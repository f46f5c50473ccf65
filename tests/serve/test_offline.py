"""The offline OmniLLM: the same pipelines as the Serve app, in one process, without Ray."""

import pytest
import torch
from PIL import Image

from omni_ray import OmniLLM
from omni_ray.errors import InvalidRequestError, ModelNotFoundError
from tests.serve.conftest import app_config

IMAGE = {"size": "64x64", "num_inference_steps": 2, "seed": 0}


@pytest.fixture(scope="module")
def omni():
    llm = OmniLLM(app_config())
    yield llm
    llm.shutdown()


def test_chat_batch(omni):
    outs = omni.generate("chat", ["one", "two", "three"], max_tokens=4, ignore_eos=True, use_tqdm=False)
    assert [o.usage["completion_tokens"] for o in outs] == [4, 4, 4]
    assert all(isinstance(o.text, str) and o.images is None for o in outs)
    assert omni.stats()["llm"]["max_batch_size"] > 1           # the list ran as one batch


def test_image(omni):
    out = omni.generate("image", "a boat", n=2, use_tqdm=False, **IMAGE)
    assert [im.size for im in out.images] == [(64, 64)] * 2 and isinstance(out.images[0], Image.Image)


def test_text2image_is_deterministic(omni):
    a = omni.generate("text2image", "a castle", max_tokens=6, use_tqdm=False, **IMAGE)
    b = omni.generate("text2image", "a castle", max_tokens=6, use_tqdm=False, **IMAGE)
    assert [s["stage"] for s in a.stages] == ["llm", "image"]
    assert a.text == b.text and a.images[0].tobytes() == b.images[0].tobytes()


def test_llm_encoder_hands_hidden_states_to_the_dit(omni):
    out = omni.generate("text2image-llm-encoder", "a red fox", use_tqdm=False, **IMAGE)
    enc, dit = out.stages
    assert enc["output"] == "hidden_states" and enc["shape"][1] == 64 and dit["stage"] == "image-llm"
    hs = omni.engine("llm").engine.encode(["a red fox"])[0]
    assert list(hs.shape) == enc["shape"] and torch.isfinite(hs).all()
    assert out.images[0].size == (64, 64)
    # the encoder's prompt tokens count in usage (one per hidden-state row), no completion tokens
    assert out.usage == {"prompt_tokens": enc["shape"][0], "completion_tokens": 0, "total_tokens": enc["shape"][0]}
    assert enc["shape"][0] > 0


def test_errors(omni):
    with pytest.raises(ModelNotFoundError):
        omni.generate("nope", "x")
    with pytest.raises(InvalidRequestError):
        omni.generate("chat", "x", max_tokens=-1, use_tqdm=False)
    with pytest.raises(InvalidRequestError):
        omni.generate("image", "x", size="65x64", use_tqdm=False)
    ok = omni.generate("chat", "still fine", max_tokens=2, use_tqdm=False)   # errors left the engines healthy
    assert ok.usage["completion_tokens"] <= 2
