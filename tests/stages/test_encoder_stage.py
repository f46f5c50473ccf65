"""The media encoders as a stage of their own (``kind: encoder``, ``stages.<llm>.encoder``): offline in one
``OmniLLM``, a chat with images (and audio) gives the same tokens as the inline towers, the decoder's engine
loads no towers and takes the encoder stage's outputs as they are; concurrent calls share a tower call; an
engine without towers refuses media without embeddings (a 400 naming multi_modal_data) and serves on."""

from __future__ import annotations

import asyncio

import pytest
import torch

from omni_ray import OmniLLM
from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.config import EncoderEngineConfig, load_config
from omni_ray.errors import InvalidRequestError, ModelNotFoundError
from omni_ray.stages import ARRequest
from omni_ray.stages.encoder import EncoderStageEngine
from tests.ar.conftest import PROMPTS, make_llm
from tests.ar.test_mm_encoders import _image, _wave

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _ar(model: str, device: str, **extra) -> dict:
    return {"kind": "ar", "engine": {"model": {"path": model}, "device": device, "enforce_eager": device == "cpu",
                                     "cache": {"block_size": 16, "num_blocks": 256},
                                     "scheduler": {"max_model_len": 512}}} | extra


def split_config(model: str, device: str = "cpu") -> dict:
    """``inline``: the towers in the AR engine; ``split``: the same model with an encoder stage ``enc``."""
    return {"stages": {"inline": _ar(model, device), "split": _ar(model, device, encoder="enc"),
                       "enc": {"kind": "encoder", "engine": {"model": {"path": model}, "device": device}}}}


def _chat(*parts, words="Describe it."):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": words}]}]


def _tokens(omni: OmniLLM, stage: str, msgs: list[dict], rid: str) -> list[int]:
    async def run():
        return [t async for d in omni.stage(stage).generate(ARRequest(rid, messages=msgs, params=GREEDY))
                for t in d["token_ids"]]
    return omni._run(run())


CASES = [("tiny:qwen2.5-vl", [{"type": "image", "image": _image(100, 150, 1)},
                             {"type": "image", "image": _image(64, 90, 2)}]),
         ("tiny:qwen2.5-omni", [{"type": "image", "image": _image(90, 120, 3)},
                               {"type": "audio", "audio": (_wave(16000 * 2 + 321, 4), 16000)}])]


@pytest.mark.parametrize("model, parts", CASES)
def test_offline_tokens_equal_inline(model, parts):
    check_split_equals_inline(model, parts, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("model, parts", CASES)
def test_offline_tokens_equal_inline_cuda(model, parts):
    """bf16 on CUDA (graphs on): the encoder stage's outputs reach the decoder bit for bit."""
    check_split_equals_inline(model, parts, "cuda")


def check_split_equals_inline(model: str, parts: list[dict], device: str) -> None:
    with OmniLLM(split_config(model, device)) as omni:
        msgs = _chat(*parts)
        inline = _tokens(omni, "inline", msgs, "inline-1")
        split = _tokens(omni, "split", msgs, "split-1")
        assert split == inline and len(split) == GREEDY.max_tokens
        # the decoder loaded no towers and ran none: it took the encoder stage's outputs as they are
        llm, enc = omni.engine("split").engine, omni.stage("enc")
        towers = llm.runner.encoders
        assert (towers.vision, towers.audio) == (None, None) and towers.encoded_items == 0
        assert towers.received_items == len(parts) == enc.stats()["encoded_items"]
        assert omni.engine("inline").engine.runner.encoders.encoded_items == len(parts)
        hashes = list(enc.encoders.cache.entries)
        for h in hashes:
            assert torch.equal(towers.cache.get(h), enc.encoders.cache.get(h))
        assert llm.engine_stats()["media_received_items"] == len(parts)
        # again (other words): the encoder stage's cache answers, the tokens still equal the inline stage's
        msgs2 = _chat(*parts, words="And now?")
        assert _tokens(omni, "split", msgs2, "split-2") == _tokens(omni, "inline", msgs2, "inline-2")
        assert enc.stats()["encoded_items"] == len(parts) and enc.stats()["cache_hits"] >= len(parts)


def test_concurrent_calls_share_a_batch():
    """Calls within the batching window run as one batch; each gets its own items' rows, equal to the
    items encoded alone."""
    from omni_ray.ar.multimodal import MultiModalProcessor
    from omni_ray.testing import resolve_model

    path = resolve_model("tiny:qwen2.5-vl")
    proc = MultiModalProcessor.from_pretrained(path)
    items = [proc.image_item(_image(40 + 8 * i, 60, i)) for i in range(4)]

    async def main():
        eng = EncoderStageEngine(EncoderEngineConfig(model={"path": "tiny:qwen2.5-vl"}, device="cpu",
                                                     batch_wait_s=0.05, cache_tokens=0))
        eng.start()
        try:
            together = await asyncio.gather(eng.encode(items[:1]), eng.encode(items[1:3]), eng.encode(items[3:]))
            batches = eng.stats()["batches"]
            alone = [await eng.encode([it]) for it in items]
            return together, batches, alone
        finally:
            await eng.shutdown()

    together, batches, alone = asyncio.run(main())
    assert batches == 1
    flat = [e for call in together for e in call]
    assert [tuple(e.shape) for e in flat] == [(it.length, flat[0].shape[1]) for it in items]
    for a, b in zip(flat, alone):
        assert torch.allclose(a, b[0], atol=1e-5)


def test_engine_without_towers_refuses_media_without_embeddings():
    from omni_ray.ar.multimodal import MultiModalProcessor

    llm = make_llm("tiny:qwen2.5-vl", media_towers=False)
    assert llm.runner.encoders.vision is None
    img = _image(50, 70, 5)
    text = llm.tokenizer.apply_chat_template(_chat({"type": "image"}), tokenize=False, add_generation_prompt=True)
    with pytest.raises(InvalidRequestError, match="came without its embedding") as e:
        llm.generate([{"prompt": text, "multi_modal_data": {"image": img}}], GREEDY, use_tqdm=False)
    assert e.value.param == "multi_modal_data"
    mm = MultiModalProcessor.from_pretrained(llm.model_path)(text, images=[img])
    wrong = torch.zeros(mm.items[0].length + 1, llm.arch.hidden_size)
    mm.items[0] = mm.items[0].without_inputs(wrong)
    with pytest.raises(InvalidRequestError, match="embedding of shape") as e:
        llm.generate([mm], GREEDY, use_tqdm=False)
    assert e.value.param == "multi_modal_data"
    out = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]            # the engine still serves
    ref = make_llm("tiny:qwen2.5-vl").generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]
    assert out["token_ids"] == ref["token_ids"]


def test_items_with_embeddings_spend_no_encoder_budget():
    """With a budget of one encoder token per step, an inline prompt with two images is cut before the
    second (each image's tower runs in a step of its own); when the images came with their embeddings
    the whole prompt goes in one step."""
    from omni_ray.ar.multimodal import MultiModalProcessor

    def llm(**kw):
        out = make_llm("tiny:qwen2.5-vl", max_num_batched_tokens=4096, enable_prefix_caching=False, **kw)
        out.scheduler.cfg = out.scheduler.cfg.model_copy(update={"max_num_encoder_tokens": 1})
        return out

    inline = llm()
    text = inline.tokenizer.apply_chat_template(_chat({"type": "image"}, {"type": "image"}), tokenize=False,
                                                add_generation_prompt=True)
    proc = MultiModalProcessor.from_pretrained(inline.model_path)
    images = [_image(60, 80, 6), _image(50, 40, 7)]
    mm = proc(text, images=images)
    inline.add_request(mm, SamplingParams(max_tokens=1), "a")
    assert inline.scheduler.schedule().num_new == [mm.items[1].offset]      # stops right before image 2
    given = proc(text, images=images)
    given.items = [it.without_inputs(inline.runner.encoders._encode([it])[0]) for it in given.items]
    split = llm(media_towers=False)
    split.add_request(given, SamplingParams(max_tokens=1), "b")
    assert split.scheduler.schedule().num_new == [len(given.token_ids)]     # the whole prompt at once


def test_config_names_an_encoder_stage():
    from omni_ray.errors import ConfigError

    cfg = split_config("tiny:qwen2.5-vl")
    assert load_config(cfg).stages["split"].engine_config().media_towers is False
    assert load_config(cfg).stages["inline"].engine_config().media_towers is True
    cfg["stages"]["split"]["encoder"] = "inline"
    with pytest.raises(ConfigError, match="stages.split.encoder: .*stage 'inline' is ar"):
        load_config(cfg)
    cfg["stages"]["split"]["encoder"] = "enc"
    cfg["pipelines"] = {"p": {"steps": [{"stage": "enc"}]}}
    with pytest.raises(ConfigError, match="pipelines.p.steps.0.stage: 'enc' is an encoder stage"):
        load_config(cfg)


def test_encoder_stage_is_a_deployment_but_no_model():
    """The app builds a deployment for the encoder stage (one rank, its own options) and lists no model
    for it: requests name the AR stage."""
    from deployments.ingress.catalog import Catalog
    from deployments.options import stage_options

    raw = split_config("tiny:qwen2.5-vl")
    raw["stages"]["split"]["engine"]["model"]["name"] = "vl"
    raw["stages"]["enc"]["engine"]["model"]["name"] = "vl-towers"
    cfg = load_config(raw)
    opts = stage_options("enc", cfg.stages["enc"])
    assert opts["name"] == "enc" and "placement_group_bundles" not in opts and opts["num_replicas"] == 1
    cat = Catalog(cfg)
    assert [c["stage"] for c in cat.model_cards()] == ["inline", "split"]
    assert cat.kinds["enc"] == "encoder"
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        cat.model("vl-towers")                                  # the encoder's served name is no model
    assert cat.model("vl")["stage"] == "split"
