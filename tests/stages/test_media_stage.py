"""The AR stage with a multimodal model: chat messages with image_url / input_audio parts (what the
HTTP API sends) become the same tokens as the offline engine's; bad media is a 400 naming the part,
refused before the engine sees it (its counters unchanged), and the stage goes on serving."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import soundfile as sf

from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.config import ARStageConfig, MediaConfig, validate
from omni_ray.errors import InvalidRequestError
from omni_ray.stages import ARRequest
from omni_ray.stages.ar import ARStageEngine
from tests.ar.conftest import make_llm
from tests.ar.test_mm_encoders import _image, _wave

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


def _cfg(model):
    return validate(ARStageConfig, {"engine": {"model": {"path": model}, "enforce_eager": True, "core_process": "off",
                                               "cache": {"block_size": 16, "num_blocks": 256},
                                               "scheduler": {"max_model_len": 512}}}).engine


def _png_url(img) -> str:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()


def _wav_b64(wave, rate=16000) -> str:
    b = io.BytesIO()
    sf.write(b, wave, rate, format="WAV")
    return base64.b64encode(b.getvalue()).decode()


def _chat(*parts):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe it."}]}]


def test_image_and_audio_chat_through_the_stage():
    img, wave = _image(80, 120, 3), _wave(16000, 4)
    msgs = _chat({"type": "image_url", "image_url": {"url": _png_url(img)}},
                 {"type": "input_audio", "input_audio": {"data": _wav_b64(wave), "format": "wav"}})

    async def main():
        eng = ARStageEngine(_cfg("tiny:qwen2.5-omni"), media=MediaConfig(max_image_pixels=200 * 200))
        eng.start()
        try:
            out = [d async for d in eng.generate(ARRequest("m-1", messages=msgs, params=GREEDY))]
            stats = eng.engine.engine.engine_stats()
            bad = [
                (_chat({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}),
                 "messages.0.content.0.image_url", "does not fetch URLs"),
                (_chat({"type": "image_url", "image_url": {"url": _png_url(_image(300, 300, 1))}}),
                 "messages.0.content.0.image_url", "max_image_pixels"),
                (_chat({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}),
                 "messages.0.content.0.image_url", "not a decodable image"),
                (_chat({"type": "input_audio", "input_audio": {"data": _wav_b64(wave), "format": "flac8"}}),
                 "messages.0.content.0.input_audio.data", "format 'flac8'"),
                (_chat(*[{"type": "image_url", "image_url": {"url": _png_url(img)}}] * 9), "messages", "max_items"),
            ]
            for i, (m, param, words) in enumerate(bad):
                with pytest.raises(InvalidRequestError, match=words) as e:
                    [d async for d in eng.generate(ARRequest(f"bad-{i}", messages=m, params=GREEDY))]
                assert e.value.param == param
            after = eng.engine.engine.engine_stats()
            assert (after["steps"], after["prefill_tokens"]) == (stats["steps"], stats["prefill_tokens"])
            again = [d async for d in eng.generate(ARRequest("m-2", messages=msgs, params=GREEDY))]
            return out, again
        finally:
            await eng.shutdown()

    out, again = asyncio.run(main())
    tokens = [t for d in out for t in d["token_ids"]]
    assert tokens == [t for d in again for t in d["token_ids"]]
    ref = make_llm("tiny:qwen2.5-omni").chat(
        _chat({"type": "image", "image": img}, {"type": "audio", "audio": (wave, 16000)}), GREEDY, use_tqdm=False)
    assert tokens == ref[0]["token_ids"]
    assert out[-1]["num_prompt_tokens"] > 30                  # the expanded placeholders count as prompt tokens


def test_text_model_refuses_media():
    async def main():
        eng = ARStageEngine(_cfg("tiny:qwen3"))
        eng.start()
        try:
            with pytest.raises(InvalidRequestError, match="takes text only"):
                [d async for d in eng.generate(ARRequest("t-1", messages=_chat(
                    {"type": "image_url", "image_url": {"url": _png_url(_image(40, 40, 1))}}), params=GREEDY))]
        finally:
            await eng.shutdown()

    asyncio.run(main())


def test_audio_input_resampled_like_the_processor():
    """A 44.1 kHz clip is resampled to the feature extractor's rate before its features."""
    wave = np.sin(2 * np.pi * 330 * np.arange(44100) / 44100).astype(np.float32)
    from omni_ray.ar.multimodal.prompts import split_chat

    msgs = _chat({"type": "input_audio", "input_audio": {"data": _wav_b64(wave, 44100), "format": "wav"}})
    _, _, audios = split_chat(msgs, MediaConfig(), 16000)
    assert audios[0].shape == (16000,)
