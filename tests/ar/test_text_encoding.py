"""The AR engine as Qwen-Image's text encoder, offline (``LLM.encode(..., encoding=...)``): the
hidden states equal the diffusers pipelines' ``encode_prompt`` (CPU, float32, tiny checkpoints), the
template's dropped prefix comes from the prefix cache, and a hit gives what a miss gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omni_ray.ar import LLM
from omni_ray.ar.models.checkpoint import checkpoint_layout
from omni_ray.ar.text_encoding import QWEN_IMAGE, QWEN_IMAGE_EDIT, TextEncoding, text_encoding_for
from omni_ray.errors import ConfigError, InvalidRequestError
from omni_ray.testing import resolve_model

PROMPTS = ["a red fox in the snow",
           "a lighthouse on a rocky cliff at dusk, waves crashing below, gulls overhead and a lone keeper at the door"]


def make_llm(model: str, **kw) -> LLM:
    args = dict(enforce_eager=True, device="cpu", kvcache_block_size=8, num_kvcache_blocks=128, max_model_len=512)
    return LLM(model, **(args | kw))


def image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def reference_rows(embeds: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The pipeline's padded batch as one unpadded [T_i, H] per prompt (its mask's rows)."""
    if mask is None:
        return list(embeds)
    return [e[m.bool()] for e, m in zip(embeds, mask)]


def with_image_positions(text_encoder):
    """``text_encoder`` (Qwen2.5-VL) computing the M-RoPE positions of image tokens from its input ids, as
    transformers 4.x did and Qwen-Image-Edit was trained with. diffusers' edit pipelines pass the VL model
    no ``mm_token_type_ids``, which transformers >= 5.15 needs for them: without it the image tokens get
    1-D positions (huggingface/diffusers#14194, fix in PR #14189); the AR engine computes them as the
    model defines them, so the reference here is the pipeline with that fix."""
    forward = text_encoder.forward

    def forward_with_types(input_ids=None, **kw):
        kw.setdefault("mm_token_type_ids", (input_ids == text_encoder.config.image_token_id).int())
        return forward(input_ids=input_ids, **kw)

    text_encoder.forward = forward_with_types
    return text_encoder


def t2i_pipeline(path):
    """diffusers' ``QwenImagePipeline`` with the checkpoint's text encoder and tokenizer (all that
    encode_prompt uses; ``from_pretrained`` would load the transformer and VAE too)."""
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "text_encoder", dtype=torch.float32)
    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=enc.eval(),
                             tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"), transformer=None)


def edit_pipeline(path):
    """diffusers' ``QwenImageEditPipeline`` from the checkpoint's text encoder (``with_image_positions``),
    tokenizer and processor (the processor class built as tests/ar/test_mm_encoders.py does without
    torchvision); encode_prompt needs no transformer, VAE or scheduler."""
    from diffusers import QwenImageEditPipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from tests.ar.test_mm_encoders import auto_processor

    enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "text_encoder", dtype=torch.float32)
    return QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=with_image_positions(enc.eval()),
                                 tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
                                 processor=auto_processor(path / "processor"), transformer=None)


def pipeline_image(pipe, img: Image.Image) -> Image.Image:
    """What ``QwenImageEditPipeline.__call__`` hands ``encode_prompt`` for the user's image."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    w, h, _ = calculate_dimensions(1024 * 1024, img.size[0] / img.size[1])
    return pipe.image_processor.resize(img, h, w)


@pytest.fixture(scope="module")
def qwen_image():
    return t2i_pipeline(resolve_model("tiny:qwen-image")), make_llm("tiny:qwen-image")


def test_recipes_are_the_pipelines_own_settings():
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    for cls, recipe in ((QwenImagePipeline, QWEN_IMAGE), (QwenImageEditPipeline, QWEN_IMAGE_EDIT)):
        parts = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
        pipe = cls(**parts, **({"processor": None} if recipe.image else {}))
        assert text_encoding_for(cls.__name__) is recipe
        assert (recipe.template, recipe.drop_tokens) == (pipe.prompt_template_encode,
                                                        pipe.prompt_template_encode_start_idx)
        assert recipe.layer == -1
    assert QWEN_IMAGE.max_tokens == QwenImagePipeline(None, None, None, None, None).tokenizer_max_length
    assert text_encoding_for("PixArtSigmaPipeline") is None


def test_layout_of_a_diffusers_directory_and_of_an_hf_one(tmp_path):
    qi = checkpoint_layout("tiny:qwen-image")
    assert (qi.weights.name, qi.tokenizer.name, qi.processor.name) == ("text_encoder", "tokenizer", "tokenizer")
    assert qi.pipeline == "QwenImagePipeline"
    edit = checkpoint_layout("tiny:qwen-image-edit")
    assert (edit.processor.name, edit.pipeline) == ("processor", "QwenImageEditPipeline")
    vl = checkpoint_layout("tiny:qwen2.5-vl")
    assert vl.weights == vl.tokenizer == vl.processor == vl.root and vl.pipeline is None
    (tmp_path / "model_index.json").write_text('{"_class_name": "SomePipeline", "vae": ["diffusers", "X"]}')
    with pytest.raises(ConfigError, match="without a text_encoder"):
        checkpoint_layout(tmp_path)


def test_qwen_image_hidden_states_equal_diffusers_and_the_prefix_cache_serves_the_template(qwen_image):
    pipe, llm = qwen_image
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu")
    want = reference_rows(embeds.detach(), mask)
    assert want[0].shape[0] != want[1].shape[0]                       # two lengths: a padded reference
    assert llm.mm_processor is None and llm.runner.encoders.vision is None     # text only: no vision tower loaded
    bs, drop = llm.config.cache.block_size, QWEN_IMAGE.drop_tokens
    got = llm.encode(PROMPTS, encoding=QWEN_IMAGE)                    # one step, nothing cached yet
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    s0 = llm.engine_stats()
    again = llm.encode(PROMPTS[1], encoding=QWEN_IMAGE)[0]            # the template's full blocks: cached
    s1 = llm.engine_stats()
    cached = drop // bs * bs
    n = len(QWEN_IMAGE.inputs(llm.tokenizer, None, PROMPTS[1]))
    assert s1["prefix_cache_hit_tokens"] - s0["prefix_cache_hit_tokens"] == cached > 0
    assert s1["prefill_tokens"] - s0["prefill_tokens"] == n - cached
    torch.testing.assert_close(again, got[1], atol=1e-5, rtol=1e-5)   # a hit equals the miss


def test_dropped_rows_are_never_served_past_the_drop(qwen_image):
    """Without a recipe, ``drop_tokens=k`` returns rows k..; positions past k are computed even when the
    whole prompt is cached (hidden states are not in the cache), and equal the full encode's rows."""
    _, llm = qwen_image
    ids = QWEN_IMAGE.inputs(llm.tokenizer, None, PROMPTS[0])
    full = llm.encode([ids], layer=-1)[0]
    s0 = llm.engine_stats()
    part = llm.encode([ids], layer=-1, drop_tokens=20)[0]
    s1 = llm.engine_stats()
    bs = llm.config.cache.block_size
    assert s1["prefix_cache_hit_tokens"] - s0["prefix_cache_hit_tokens"] == 20 // bs * bs
    torch.testing.assert_close(part, full[20:], atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidRequestError) as err:
        llm.encode([ids], drop_tokens=len(ids))
    assert err.value.param == "prompt"


def test_bad_text_encoder_requests_are_invalid_requests(qwen_image):
    _, llm = qwen_image
    with pytest.raises(InvalidRequestError) as err:                   # an image template, no vision input
        llm.encode([{"prompt": "make it blue", "multi_modal_data": {"image": image(32, 32)}}],
                   encoding=QWEN_IMAGE_EDIT)
    assert err.value.param == "image"
    with pytest.raises(InvalidRequestError) as err:                   # a text recipe given an image
        llm.encode([{"prompt": "a fox", "multi_modal_data": {"image": image(32, 32)}}], encoding=QWEN_IMAGE)
    assert err.value.param == "image"
    with pytest.raises(InvalidRequestError) as err:                   # longer than the engine's context
        llm.encode(["fox " * 600], encoding=QWEN_IMAGE)
    assert err.value.param == "prompt"
    short = TextEncoding("<|im_start|>user\n{}<|im_end|>\n", drop_tokens=3, max_tokens=8)
    (out,) = llm.encode(["fox " * 600], encoding=short)               # truncated as the pipeline truncates
    assert out.shape[0] == 8
    assert llm.encode(["a fox"], encoding=QWEN_IMAGE)[0].shape[1] == llm.arch.hidden_size    # still serving


def test_qwen_image_edit_hidden_states_equal_diffusers():
    path = resolve_model("tiny:qwen-image-edit")
    pipe, llm = edit_pipeline(path), make_llm("tiny:qwen-image-edit")
    img = image(80, 48, seed=3)                                       # non-square: resized to 1312 x 800 first
    for prompt in ("make the sky purple", "add a small red boat near the left edge of the water"):
        embeds, mask = pipe.encode_prompt(prompt, image=pipeline_image(pipe, img), device="cpu")
        (want,) = reference_rows(embeds.detach(), mask)
        (got,) = llm.encode([{"prompt": prompt, "multi_modal_data": {"image": img}}], encoding=QWEN_IMAGE_EDIT)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(InvalidRequestError) as err:                   # the edit recipe needs its image
        llm.encode(["make it blue"], encoding=QWEN_IMAGE_EDIT)
    assert err.value.param == "image"
