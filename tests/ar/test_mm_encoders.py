"""Our Qwen2.5-VL / Qwen2.5-Omni encoders against transformers' on the tiny checkpoints (float32, CPU).

Inputs come from the checkpoints' own processors (PIL images, numpy audio at 16 kHz) through the
sub-processors that work without torchvision (``AutoImageProcessor`` -> the PIL backend,
``AutoFeatureExtractor`` -> Whisper's). ``AutoProcessor`` itself needs torchvision (the Qwen2.5
processors build a torchvision video processor): without it, ``auto_processor`` stubs that one
video sub-processor and loads everything else from the checkpoint's files.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from omni_ray.ar.models.qwen2_5_omni_audio import load_audio_tower, output_lengths
from omni_ray.ar.models.qwen2_5_vl_vision import frame_cu_seqlens, load_vision_tower, window_order
from omni_ray.errors import ConfigError
from omni_ray.testing import resolve_model
from omni_ray.testing.tiny_mm import _spread_encoder_weights

ATOL, RTOL = 1e-5, 1e-5    # float32


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def _wave(samples: int, seed: int) -> np.ndarray:
    t = np.arange(samples) / 16000
    rs = np.random.RandomState(seed)
    return (0.3 * np.sin(2 * np.pi * rs.uniform(100, 1000) * t) + 0.05 * rs.randn(samples)).astype(np.float32)


@pytest.fixture(scope="module")
def vl():
    from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

    path = resolve_model("tiny:qwen2.5-vl")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return dict(path=path, hf=hf, ours=load_vision_tower(path), images=AutoImageProcessor.from_pretrained(path))


@pytest.fixture(scope="module")
def omni():
    from transformers import AutoFeatureExtractor, AutoImageProcessor, Qwen2_5OmniForConditionalGeneration

    path = resolve_model("tiny:qwen2.5-omni")
    hf = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return dict(path=path, hf=hf, vision=load_vision_tower(path), audio=load_audio_tower(path),
                images=AutoImageProcessor.from_pretrained(path), features=AutoFeatureExtractor.from_pretrained(path))


def _vision_pair(hf_visual, ours, inputs):
    with torch.no_grad():
        ref = hf_visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        got = ours(inputs["pixel_values"], inputs["image_grid_thw"])
    return ref, got


def _num_windows(tower, grid) -> int:
    cfg = tower.cfg
    _, cu = window_order(grid, cfg.spatial_merge_size, cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)
    return len(cu) - 1


# ------------------------------------------------------------------ vision: Qwen2.5-VL


def test_vl_one_image(vl):
    inputs = vl["images"](images=[_image(100, 150, 0)], return_tensors="pt")
    assert type(vl["images"]).__name__ == "Qwen2VLImageProcessorPil"     # no torchvision needed
    ref, got = _vision_pair(vl["hf"].model.visual, vl["ours"], inputs)
    rows = vl["ours"].num_tokens(inputs["image_grid_thw"])[0]
    assert got.shape == ref.shape == (rows, vl["hf"].config.text_config.hidden_size)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    # the image spans several attention windows, so window and full-attention blocks differ here
    assert _num_windows(vl["ours"], inputs["image_grid_thw"]) > 1


def test_vl_two_images_of_different_sizes(vl):
    inputs = vl["images"](images=[_image(224, 168, 1), _image(60, 90, 2)], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert grid[0].tolist() != grid[1].tolist()
    ref, got = _vision_pair(vl["hf"].model.visual, vl["ours"], inputs)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    # per image, as the engine splits them: the same rows as transformers' get_image_features
    with torch.no_grad():
        per_image = vl["hf"].model.get_image_features(inputs["pixel_values"], image_grid_thw=grid).pooler_output
    for mine, theirs in zip(got.split(vl["ours"].num_tokens(grid)), per_image):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=RTOL)
    # each image alone gives the same rows as in the batch: no attention across images
    alone = vl["images"](images=[_image(60, 90, 2)], return_tensors="pt")
    with torch.no_grad():
        second = vl["ours"](alone["pixel_values"], alone["image_grid_thw"])
    torch.testing.assert_close(got[-second.shape[0]:], second, atol=ATOL, rtol=RTOL)


def test_vl_odd_sized_image(vl):
    inputs = vl["images"](images=[_image(37, 231, 3)], return_tensors="pt")
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert (h // 2) % 2 == 1 or (w // 2) % 2 == 1          # merged grid not a multiple of the window: partial windows
    ref, got = _vision_pair(vl["hf"].model.visual, vl["ours"], inputs)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_vl_video_frames_attend_per_frame(vl):
    """A 2-step temporal grid (a video clip's layout): full attention is per frame, windows per frame."""
    cfg = vl["ours"].cfg
    grid = torch.tensor([[2, 8, 12]])
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    pixels = torch.randn(int(grid.prod()), dim, generator=torch.Generator().manual_seed(0))
    assert frame_cu_seqlens(grid).tolist() == [0, 96, 192]
    ref, got = _vision_pair(vl["hf"].model.visual, vl["ours"], {"pixel_values": pixels, "image_grid_thw": grid})
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ Omni thinker: vision and audio


def test_omni_vision_tower(omni):
    inputs = omni["images"](images=[_image(100, 150, 4), _image(37, 231, 5)], return_tensors="pt")
    thinker = omni["hf"].thinker
    ref, got = _vision_pair(thinker.model.visual, omni["vision"], inputs)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        feats = thinker.get_image_features(inputs["pixel_values"],
                                           image_grid_thw=inputs["image_grid_thw"]).pooler_output
    torch.testing.assert_close(got, torch.cat(feats), atol=ATOL, rtol=RTOL)


def _audio(omni, waves):
    feats = omni["features"](waves, sampling_rate=16000, return_attention_mask=True, padding="max_length",
                             return_tensors="pt")
    return feats["input_features"], feats["attention_mask"]


def _audio_pair(omni, features, mask):
    with torch.no_grad():
        ref = omni["hf"].thinker.get_audio_features(features, feature_attention_mask=mask).last_hidden_state
        got = omni["audio"](features, mask)
    return ref, got


def test_omni_audio_one_clip(omni):
    features, mask = _audio(omni, [_wave(16000, 0)])           # 1 s
    ref, got = _audio_pair(omni, features, mask)
    frames = int(mask.sum())
    assert frames > 2 * omni["audio"].cfg.n_window             # several attention chunks
    hidden = omni["hf"].config.thinker_config.text_config.hidden_size
    assert got.shape == ref.shape == (int(output_lengths(mask.sum(1))[0]), hidden)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_omni_audio_two_clips_of_different_lengths(omni):
    features, mask = _audio(omni, [_wave(16000, 1), _wave(5230, 2)])
    lens = mask.sum(1)
    assert lens[0] != lens[1] and int(lens[1]) % (2 * omni["audio"].cfg.n_window) != 0   # a short last chunk
    ref, got = _audio_pair(omni, features, mask)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    # each clip alone gives the same rows: chunks and pooling never cross clips
    alone_f, alone_m = _audio(omni, [_wave(5230, 2)])
    with torch.no_grad():
        second = omni["audio"](alone_f, alone_m)
    torch.testing.assert_close(got[-second.shape[0]:], second, atol=ATOL, rtol=RTOL)


def test_audio_token_counts_match_the_processor(omni):
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    lens = torch.arange(1, 400)
    assert output_lengths(lens).tolist() == _get_feat_extract_output_lengths(lens).tolist()


# ------------------------------------------------------------------ loading


def test_loads_in_memory_key_names(vl, tmp_path):
    """transformers 5 writes ``visual.*`` but names the module ``model.visual``; both load."""
    from safetensors.torch import save_file

    shutil.copy(vl["path"] / "config.json", tmp_path / "config.json")
    sd = {f"model.visual.{k}": v.contiguous() for k, v in vl["hf"].model.visual.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    tower = load_vision_tower(tmp_path)
    inputs = vl["images"](images=[_image(60, 90, 6)], return_tensors="pt")
    ref, got = _vision_pair(vl["hf"].model.visual, tower, inputs)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_missing_tensor_is_an_error(vl, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copy(vl["path"] / "config.json", tmp_path / "config.json")
    sd = load_file(str(vl["path"] / "model.safetensors"))
    del sd["visual.blocks.0.attn.qkv.bias"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="qkv.bias"):
        load_vision_tower(tmp_path)
    with pytest.raises(ConfigError, match="audio"):
        load_audio_tower(tmp_path)                              # Qwen2.5-VL has no audio encoder


def test_other_dimensions_follow_the_config(tmp_path):
    """A Qwen2.5-Omni thinker checkpoint with other sizes than the tiny ones (patch 16, 3 heads, window
    128, full attention first and last, n_window 5, other widths) loads and matches transformers."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(1)
    config = Qwen2_5OmniThinkerConfig(
        vision_config=dict(depth=4, hidden_size=48, intermediate_size=40, num_heads=3, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=128, out_hidden_size=40,
                           fullatt_block_indexes=[0, 3], hidden_act="silu"),
        audio_config=dict(num_mel_bins=80, encoder_layers=3, encoder_attention_heads=3, encoder_ffn_dim=40, d_model=24,
                          n_window=5, max_source_positions=16, output_dim=40),
        text_config=dict(vocab_size=128, hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 4, 4], "rope_theta": 10000.0}))
    hf = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    _spread_encoder_weights(hf, 1)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2_5_omni_thinker"

    grid = torch.tensor([[1, 12, 20], [1, 4, 6]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = torch.cat(hf.get_image_features(pixels, image_grid_thw=grid).pooler_output)
        got = load_vision_tower(tmp_path)(pixels, grid)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)

    mask = torch.zeros(2, 60, dtype=torch.long)
    mask[0, :60], mask[1, :23] = 1, 1
    features = torch.randn(2, 80, 60, generator=torch.Generator().manual_seed(3)) * mask[:, None]
    with torch.no_grad():
        ref = hf.get_audio_features(features, feature_attention_mask=mask).last_hidden_state
        got = load_audio_tower(tmp_path)(features, mask)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ tokenizer, chat template, processor


def _ids(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


def test_chat_template_renders_placeholders():
    """Both tiny tokenizers render an image part (and Omni an audio part) into the placeholder tokens
    at the ids the model config names."""
    from transformers import AutoTokenizer

    parts = [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Describe."}]
    message = [{"role": "user", "content": parts}]
    path = resolve_model("tiny:qwen2.5-omni")
    tok, cfg = AutoTokenizer.from_pretrained(path), json.loads((path / "config.json").read_text())["thinker_config"]
    ids = tok.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    vis, aud = [_ids(tok, "<|vision_bos|>"), cfg["image_token_index"], _ids(tok, "<|vision_eos|>")], \
        [cfg["audio_start_token_id"], cfg["audio_token_index"], cfg["audio_end_token_id"]]
    assert tok.image_token_id == cfg["image_token_index"] and tok.audio_token_id == cfg["audio_token_index"]
    start = ids.index(cfg["image_token_index"]) - 1
    assert ids[start:start + 6] == vis + aud
    assert tok.decode(ids).endswith("Describe.<|im_end|>\n<|im_start|>assistant\n")

    path = resolve_model("tiny:qwen2.5-vl")
    tok, cfg = AutoTokenizer.from_pretrained(path), json.loads((path / "config.json").read_text())
    ids = tok.apply_chat_template(message, tokenize=True, return_dict=True)["input_ids"]
    i = ids.index(cfg["image_token_id"])
    assert ids[i - 1:i + 2] == [cfg["vision_start_token_id"], cfg["image_token_id"], cfg["vision_end_token_id"]]


def auto_processor(path):
    """``AutoProcessor.from_pretrained(path)``. Without torchvision transformers cannot build the
    Qwen2.5 processors' video sub-processor (``Qwen2VLVideoProcessor`` needs it) nor accept a stand-in
    (its type check needs ``transformers.VideoProcessorMixin``, exported only with torchvision); then
    only that sub-processor is stubbed (no video goes through it here): the processor class, its image
    processor, feature extractor, tokenizer and chat template all come from the checkpoint's files."""
    from transformers import AutoProcessor

    try:
        import torchvision  # noqa: F401
        return AutoProcessor.from_pretrained(path)
    except ImportError:
        pass
    from unittest import mock

    from transformers import processing_utils
    from transformers.models.auto import video_processing_auto
    from transformers.video_processing_utils import BaseVideoProcessor

    check = processing_utils.ProcessorMixin.check_argument_for_proper_class

    def check_but_video(self, name, arg):
        return type(arg) if name == "video_processor" else check(self, name, arg)

    with mock.patch.object(processing_utils.ProcessorMixin, "check_argument_for_proper_class", check_but_video), \
            mock.patch.object(video_processing_auto.AutoVideoProcessor, "from_pretrained",
                              lambda *a, **k: (BaseVideoProcessor(), {})):
        return AutoProcessor.from_pretrained(path)


def test_auto_processor_expands_placeholders(vl, omni):
    """The real processor classes, loaded from the tiny checkpoints' files, expand one image and one
    audio clip into as many placeholder tokens as our encoders give rows, and their pixel values /
    features run through our towers as through transformers'."""
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Hi"}]}]
    proc = auto_processor(omni["path"])
    assert type(proc).__name__ == "Qwen2_5OmniProcessor"
    text = proc.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    out = proc(text=[text], images=[_image(100, 150, 7)], audio=[_wave(16000, 8)], return_tensors="pt")
    cfg = omni["hf"].config.thinker_config
    with torch.no_grad():
        img = omni["vision"](out["pixel_values"], out["image_grid_thw"])
        aud = omni["audio"](out["input_features"], out["feature_attention_mask"])
        ref = omni["hf"].thinker.get_audio_features(out["input_features"],
                                                    feature_attention_mask=out["feature_attention_mask"]).last_hidden_state
    torch.testing.assert_close(aud, ref, atol=ATOL, rtol=RTOL)
    ids = out["input_ids"][0]
    assert int((ids == cfg.image_token_index).sum()) == img.shape[0] > 1
    assert int((ids == cfg.audio_token_index).sum()) == aud.shape[0] > 1
    first_audio = int((ids == cfg.audio_token_index).nonzero()[0])
    assert int(ids[first_audio - 1]) == cfg.audio_start_token_id

    proc = auto_processor(vl["path"])
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    text = proc.apply_chat_template(message, tokenize=False)
    out = proc(text=[text], images=[_image(100, 150, 7)], return_tensors="pt")
    ref, got = _vision_pair(vl["hf"].model.visual, vl["ours"], out)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    assert int((out["input_ids"] == vl["hf"].config.image_token_id).sum()) == got.shape[0]


def test_bfloat16(omni):
    """Loaded in bfloat16, both towers follow transformers' bfloat16 model (inputs cast inside)."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    hf = Qwen2_5OmniForConditionalGeneration.from_pretrained(omni["path"], dtype=torch.bfloat16).eval()
    vision = load_vision_tower(omni["path"], dtype=torch.bfloat16)
    audio = load_audio_tower(omni["path"], dtype=torch.bfloat16)
    images = omni["images"](images=[_image(100, 150, 9)], return_tensors="pt")
    features, mask = _audio(omni, [_wave(8000, 10)])
    with torch.no_grad():
        pixels = images["pixel_values"].bfloat16()
        ref_v = hf.thinker.model.visual(pixels, grid_thw=images["image_grid_thw"]).pooler_output
        got_v = vision(images["pixel_values"], images["image_grid_thw"])
        ref_a = hf.thinker.get_audio_features(features.bfloat16(), feature_attention_mask=mask).last_hidden_state
        got_a = audio(features, mask)
    assert got_v.dtype == got_a.dtype == torch.bfloat16
    torch.testing.assert_close(got_v, ref_v, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_a, ref_a, atol=2e-2, rtol=2e-2)


def test_fused_padded_vision_mlp_is_exact():
    """The GPU layout of the vision MLP (gate+up in one GEMM, intermediate size padded to 128 with
    zeros) gives the same numbers as the checkpoint's three projections."""
    from omni_ray.ar.models.qwen2_5_vl_vision import load_vision_tower

    tower = load_vision_tower(resolve_model("tiny:qwen2.5-vl"))
    mlp = tower.blocks[0].mlp
    x = torch.randn(13, mlp.gate_proj.weight.shape[1])
    with torch.no_grad():
        want = mlp(x)
        inter = mlp.gate_proj.weight.shape[0]
        mlp.fuse(128)
        assert mlp.gate_up.weight.shape[0] == 2 * (inter + -inter % 128)
        torch.testing.assert_close(mlp(x), want, atol=1e-6, rtol=1e-6)
