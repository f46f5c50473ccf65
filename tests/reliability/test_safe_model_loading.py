"""Safe model loading: pickle weights refused unless allowed and then loaded without running code;
remote code never run."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from omni_ray.config import validate
from omni_ray.errors import ConfigError


# ----------------------------------------------------------------------------- safe model loading
@pytest.fixture(scope="module")
def tiny_qwen3() -> Path:
    from omni_ray.testing import resolve_model
    return Path(resolve_model("tiny:qwen3"))


def pickled_copy(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    torch.save(sd, dst / "pytorch_model.bin")
    return dst


def ar_engine(path: Path, allow_pickle: bool = False):
    from omni_ray.ar import LLM
    from omni_ray.config import AREngineConfig
    cfg = validate(AREngineConfig, {"model": {"path": str(path), "allow_pickle": allow_pickle}, "device": "cpu",
                                    "enforce_eager": True, "cache": {"block_size": 16, "num_blocks": 32},
                                    "scheduler": {"max_model_len": 128}})
    return LLM(cfg)


def greedy(llm) -> list[int]:
    from omni_ray.ar import SamplingParams
    return llm.generate(["Hello there"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)[0]["token_ids"]


def test_pickle_weights_refused_unless_allowed_then_loaded_safely(tiny_qwen3, tmp_path):
    d = pickled_copy(tiny_qwen3, tmp_path / "m")
    with pytest.raises(ConfigError, match="pickle"):
        ar_engine(d)
    assert greedy(ar_engine(d, allow_pickle=True)) == greedy(ar_engine(tiny_qwen3))


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/omni-ray-pwned-by-pickle",))


def test_allowed_pickle_still_runs_no_code(tiny_qwen3, tmp_path):
    marker = Path("/tmp/omni-ray-pwned-by-pickle")
    marker.unlink(missing_ok=True)
    d = pickled_copy(tiny_qwen3, tmp_path / "m")
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Evil()}, f)
    with pytest.raises(ConfigError, match="not a plain tensor checkpoint"):
        ar_engine(d, allow_pickle=True)
    assert not marker.exists()


# DiT: the two kinds of weighted component of a tiny PixArt (a diffusers transformer, a transformers
# T5 encoder), loaded one by one through omni_ray.dit.loader (what the DiT engine calls)
DIT_PARTS = {"transformer": ("diffusers", "PixArtTransformer2DModel", "diffusion_pytorch_model"),
             "text_encoder": ("transformers", "T5EncoderModel", "model")}
PICKLE_NAME = {"diffusion_pytorch_model": "diffusion_pytorch_model.bin", "model": "pytorch_model.bin"}


@pytest.fixture(scope="module")
def tiny_pixart() -> Path:
    from omni_ray.testing import resolve_model
    return Path(resolve_model("tiny:pixart"))


def dit_part(path: Path, name: str, allow_pickle: bool = False):
    from omni_ray.dit.loader import load_component
    library, cls, _ = DIT_PARTS[name]
    return load_component(path, name, library, cls, torch.device("cpu"), torch.float32, allow_pickle)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def pickle_dit_part(src: Path, dst: Path, name: str, keep_safetensors: bool = False, zero: bool = False) -> Path:
    """``src`` copied to ``dst`` with component ``name``'s weights (also) as a torch.save pickle."""
    from safetensors.torch import load_file
    if not dst.exists():
        shutil.copytree(src, dst)
    stem = DIT_PARTS[name][2]
    st = dst / name / f"{stem}.safetensors"
    sd = load_file(str(st))
    if not keep_safetensors:
        st.unlink()
    torch.save({k: torch.zeros_like(v) if zero else v for k, v in sd.items()}, dst / name / PICKLE_NAME[stem])
    return dst


def test_dit_pickle_weights_refused_unless_allowed_then_loaded(tiny_pixart, tmp_path):
    for name in DIT_PARTS:
        d = pickle_dit_part(tiny_pixart, tmp_path / "m", name)
        with pytest.raises(ConfigError, match="pickle"):
            dit_part(d, name)
        assert same_weights(dit_part(d, name, allow_pickle=True), dit_part(tiny_pixart, name)), name


def test_dit_prefers_safetensors_when_pickle_is_allowed(tiny_pixart, tmp_path):
    """Both formats present (the pickle zeroed): allowing pickles must not switch away from safetensors."""
    for name in DIT_PARTS:
        d = pickle_dit_part(tiny_pixart, tmp_path / "m", name, keep_safetensors=True, zero=True)
        assert same_weights(dit_part(d, name, allow_pickle=True), dit_part(tiny_pixart, name)), name


def test_dit_allowed_pickle_still_runs_no_code(tiny_pixart, tmp_path):
    marker = tmp_path / "pwned-by-pickle"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    for name in DIT_PARTS:
        d = pickle_dit_part(tiny_pixart, tmp_path / "m", name)
        with open(d / name / PICKLE_NAME[DIT_PARTS[name][2]], "wb") as f:
            pickle.dump({"weight": Evil()}, f)
        with pytest.raises(Exception):          # noqa: B017 - diffusers / transformers each raise their own
            dit_part(d, name, allow_pickle=True)
        assert not marker.exists(), name


def test_dit_remote_code_in_a_checkpoint_is_never_run(tiny_pixart, tmp_path):
    """A diffusers checkpoint whose tokenizer and text encoder configs point at custom code
    (auto_map): the code is not imported; a component from an unknown library is refused."""
    from omni_ray.dit.loader import load_components
    d = tmp_path / "m"
    shutil.copytree(tiny_pixart, d)
    marker = d / "PWNED"
    code = (f"open({str(marker)!r}, 'w').write('x')\n"
            "from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel\n"
            "class EvilTok(PreTrainedTokenizerFast):\n    pass\n"
            "class EvilConfig(T5Config):\n    pass\n"
            "class EvilModel(T5EncoderModel):\n    pass\n")
    for sub, name, auto_map in (("tokenizer", "tokenizer_config.json", {"AutoTokenizer": [None, "evil.EvilTok"]}),
                                ("text_encoder", "config.json", {"AutoConfig": "evil.EvilConfig",
                                                                 "AutoModel": "evil.EvilModel"})):
        (d / sub / "evil.py").write_text(code)
        cfg = json.loads((d / sub / name).read_text())
        cfg["auto_map"] = auto_map
        (d / sub / name).write_text(json.dumps(cfg))
    _, comps = load_components(d, torch.device("cpu"), torch.float32)
    assert type(comps["tokenizer"]).__name__ != "EvilTok" and type(comps["text_encoder"]).__name__ == "T5EncoderModel"
    assert not marker.exists()
    index = json.loads((d / "model_index.json").read_text())
    index["text_encoder"] = ["evil", "EvilModel"]
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="unsupported library"):
        load_components(d, torch.device("cpu"), torch.float32)
    assert not marker.exists()


def test_remote_code_in_a_checkpoint_is_never_run(tiny_qwen3, tmp_path):
    """A checkpoint whose configs point at custom code (auto_map): the code is not imported."""
    d = tmp_path / "m"
    shutil.copytree(tiny_qwen3, d)
    marker = d / "PWNED"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                               "from transformers import PreTrainedTokenizerFast\n"
                               "class EvilTok(PreTrainedTokenizerFast):\n    pass\n")
    for name, key, target in (("tokenizer_config.json", "AutoTokenizer", [None, "evil.EvilTok"]),
                              ("config.json", "AutoConfig", "evil.EvilTok")):
        cfg = json.loads((d / name).read_text())
        cfg["auto_map"] = {key: target}
        (d / name).write_text(json.dumps(cfg))
    llm = ar_engine(d)
    assert len(greedy(llm)) == 6
    assert not marker.exists()
