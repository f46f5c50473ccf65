"""The locally built checkpoints are real diffusers-format directories."""

import json

import pytest
import torch

from omni_ray.dit.families import load_family
from omni_ray.errors import ConfigError
from omni_ray.testing import available, resolve_model
from omni_ray.testing.tiny_dit import builders


def test_builders_cover_the_families():
    names = set(builders())
    assert {"tiny:pixart", "tiny:sd3", "tiny:pixart-llm", "shape:pixart-sigma-xl"} <= names
    assert names <= set(available())


@pytest.mark.parametrize("spec, cls", [("tiny:pixart", "PixArtSigmaPipeline"),
                                       ("tiny:sd3", "StableDiffusion3Pipeline")])
def test_diffusers_loads_the_directory(spec, cls):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(resolve_model(spec)), use_safetensors=True)
    assert type(pipe).__name__ == cls
    assert not list(resolve_model(spec).rglob("*.bin"))


def test_llm_conditioned_variant_matches_the_tiny_ar_model():
    path = resolve_model("tiny:pixart-llm")
    index = json.loads((path / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    tr_cfg = json.loads((path / "transformer" / "config.json").read_text())
    ar_cfg = json.loads((resolve_model("tiny:qwen3") / "config.json").read_text())
    assert tr_cfg["caption_channels"] == ar_cfg["hidden_size"]
    fam = load_family(path, torch.device("cpu"), torch.float32)
    assert not fam.has_text_encoder and fam.caption_dim == ar_cfg["hidden_size"]


def test_unsupported_pipeline_is_a_config_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SomeOtherPipeline"}))
    with pytest.raises(ConfigError, match="not supported"):
        load_family(tmp_path, torch.device("cpu"), torch.float32)


def test_not_a_diffusers_directory(tmp_path):
    with pytest.raises(ConfigError, match="model_index.json"):
        load_family(tmp_path, torch.device("cpu"), torch.float32)
