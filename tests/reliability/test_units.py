"""The protections without Ray: the Gate (keys, body size, stray exceptions), request limits and
stage_args checks, the OpenAPI document, pins, and safe model loading (pickle, remote code)."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI

from deployments.gate import Gate, GateSettings
from deployments.http import install_handlers
from deployments.openapi_doc import install_openapi
from deployments.pins import Pins
from deployments.protocol import (CompletionRequest, ImageGenerationRequest, _first_non_utf8,
                                  check_pipeline_limits, check_text_limits)
from omni_ray.config import AppConfig, LimitsConfig, OmniConfig, PipelineConfig, validate
from omni_ray.errors import ConfigError, InvalidRequestError
from omni_ray.pipeline import StageArgs

KEY = "unit-test-key-123"


# ----------------------------------------------------------------------------- the Gate
def gate_app(keys=(KEY,), max_body=2048, configured=True) -> FastAPI:
    app = FastAPI()
    install_handlers(app)
    app.add_middleware(Gate)
    if configured:
        app.state.gate = GateSettings.from_app(validate(AppConfig, {"api_keys": list(keys),
                                                                    "limits": {"max_body_bytes": max_body}}))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(body: dict):
        return {"n": len(json.dumps(body))}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    @app.get("/dead")
    async def dead():
        import ray.exceptions
        raise ray.exceptions.ActorDiedError()

    return app


async def call(app, method, path, **kw) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.request(method, path, **kw)


def run(coro):
    import asyncio
    return asyncio.run(coro)


@pytest.mark.parametrize("auth,status", [(None, 401), ("Bearer nope-nope-nope", 401), (f"Bearer {KEY}", 200),
                                         (f"bearer {KEY}", 200), (f"Basic {KEY}", 401), (KEY, 401),
                                         ("Bearer", 401), (f"Bearer {KEY} ", 200)])
def test_keys(auth, status):
    headers = {"authorization": auth} if auth else {}
    r = run(call(gate_app(), "POST", "/echo", json={"a": 1}, headers=headers))
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"


def test_health_open_and_unconfigured_gate_fails_closed():
    assert run(call(gate_app(), "GET", "/health")).status_code == 200
    app = gate_app(configured=False)
    assert run(call(app, "GET", "/health")).status_code == 200
    r = run(call(app, "POST", "/echo", json={}))
    assert r.status_code == 503 and r.json()["error"]["type"] == "resource_error"


def test_no_keys_means_open():
    assert run(call(gate_app(keys=()), "POST", "/echo", json={"a": 1})).status_code == 200


def test_every_key_is_compared(monkeypatch):
    """No early exit on a match: the number of compares does not depend on which key matched."""
    import deployments.gate as gate

    calls = []
    real = gate.hmac.compare_digest
    monkeypatch.setattr(gate.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    s = GateSettings.from_app(validate(AppConfig, {"api_keys": ["first-key-000", "second-key-00", "third-key-000"]}))
    for presented in (b"Bearer first-key-000", b"Bearer third-key-000", b"Bearer wrong-key-000"):
        calls.clear()
        s.authorized(presented)
        assert len(calls) == 3


def test_env_keys(monkeypatch):
    monkeypatch.setenv("OMNI_RAY_API_KEYS", "env-key-1234, other-key-5678")
    s = GateSettings.from_app(validate(AppConfig, {}))
    assert s.authorized(b"Bearer other-key-5678") and not s.authorized(b"Bearer env-key")


def test_short_or_padded_keys_are_a_config_error():
    for bad in (["short"], [" padded-key-123"], [""]):
        with pytest.raises(ConfigError):
            validate(AppConfig, {"api_keys": bad})


def test_trust_remote_code_is_a_config_error():
    from omni_ray.config import ModelConfig
    from omni_ray.ar import LLM

    with pytest.raises(ConfigError, match="trust_remote_code"):
        validate(ModelConfig, {"path": "tiny:qwen3", "trust_remote_code": True})
    with pytest.raises(ConfigError, match="trust_remote_code"):
        LLM("tiny:qwen3", device="cpu", trust_remote_code=True)
    assert validate(ModelConfig, {"path": "tiny:qwen3", "trust_remote_code": False}).trust_remote_code is False


def test_body_limit_by_header_and_by_count():
    app = gate_app()
    keyed = {"authorization": f"Bearer {KEY}"}
    big = json.dumps({"a": "x" * 3000}).encode()
    r = run(call(app, "POST", "/echo", content=big, headers=keyed | {"content-type": "application/json"}))
    assert r.status_code == 400 and "larger than 2048" in r.json()["error"]["message"]

    async def chunks():
        yield b'{"a": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    r = run(call(app, "POST", "/echo", content=chunks(), headers=keyed | {"content-type": "application/json"}))
    assert r.status_code == 400 and "larger than 2048" in r.json()["error"]["message"], r.text
    r = run(call(app, "POST", "/echo", json={"a": "x" * 100}, headers=keyed))
    assert r.status_code == 200


def test_stray_exceptions_become_openai_errors():
    keyed = {"authorization": f"Bearer {KEY}"}
    r = run(call(gate_app(), "GET", "/boom", headers=keyed))
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    r = run(call(gate_app(), "GET", "/dead", headers=keyed))
    assert r.status_code == 503 and r.json()["error"]["type"] == "engine_error"


# ----------------------------------------------------------------------------- request limits
def omni_config() -> OmniConfig:
    from tests.reliability.conftest import base_config
    return validate(OmniConfig, base_config())


def limits(**kw) -> LimitsConfig:
    return validate(LimitsConfig, {"max_tokens": 16, "max_steps": 4, "max_image_pixels": 64 * 64, **kw})


def check(pipeline: str, per_stage=None, text=None, image=None, lim=None):
    cfg = omni_config()
    kinds = {k: s.kind for k, s in cfg.stages.items()}
    args = StageArgs(text=text or {}, image=image or {}, per_stage=per_stage or {})
    check_pipeline_limits(pipeline, cfg.pipelines[pipeline], kinds, args, lim or limits())
    return args


@pytest.mark.parametrize("pipeline,per_stage,param", [
    ("image", {"image": {"num_inference_steps": 5}}, "stage_args.image.num_inference_steps"),
    ("image", {"image": {"size": "128x128"}}, "stage_args.image.size"),
    ("image", {"image": {"height": 64, "width": 72}}, "stage_args.image.size"),
    ("image", {"image": {"n": 9}}, "stage_args.image.n"),
    ("image", {"image": {"height": 33}}, "stage_args.image.height"),
    ("image", {"image": {"guidance_scale": float("inf")}}, "stage_args.image.guidance_scale"),
    ("chat", {"llm": {"max_tokens": 17}}, "stage_args.llm.max_tokens"),
    ("chat", {"llm": {"temperature": "hot"}}, "stage_args.llm.temperature"),
    ("chat", {"llm": {"unknown": 1}}, "stage_args.llm.unknown"),
    ("chat", {"llm": {"stop": ["a"] * 5}}, "stage_args.llm.stop"),
    ("chat", {"image": {}}, "stage_args"),
    ("chat", {"llm": 5}, "stage_args.llm"),
    ("text2image", {"llm": {"max_tokens": 100}}, "stage_args.llm.max_tokens"),
])
def test_stage_args_cannot_bypass_limits(pipeline, per_stage, param):
    with pytest.raises(InvalidRequestError) as e:
        check(pipeline, per_stage)
    assert e.value.param == param


def test_request_wide_args_are_checked_too():
    with pytest.raises(InvalidRequestError) as e:
        check("chat", text={"max_tokens": 17})
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        check("image", image={"num_inference_steps": "many"})
    assert e.value.param == "num_inference_steps"


@pytest.mark.parametrize("pipeline,text,image,param", [
    ("chat", None, {"num_images_per_prompt": 9}, "n"),
    ("chat", None, {"num_inference_steps": 5}, "num_inference_steps"),
    ("chat", None, {"size": "128x128"}, "size"),
    ("image", {"max_tokens": 17}, None, "max_tokens"),
    ("image", {"stop": ["a"] * 5}, None, "stop"),
])
def test_request_wide_limits_hold_whatever_the_pipeline(pipeline, text, image, param):
    """A request-wide value over a limit is a 400 even where no step of the pipeline uses it (the
    OpenAPI document states these limits as bounds of the request body)."""
    with pytest.raises(InvalidRequestError) as e:
        check(pipeline, text=text, image=image)
    assert e.value.param == param


def test_valid_stage_args_pass_and_are_normalized():
    args = check("text2image", {"llm": {"max_tokens": 8, "stop": "x"}, "image": {"size": "64x32", "n": 2}})
    assert args.per_stage == {"llm": {"max_tokens": 8, "stop": ["x"]},
                              "image": {"height": 32, "width": 64, "num_images_per_prompt": 2}}


def test_chat_max_tokens_is_checked_even_when_max_completion_tokens_wins():
    from deployments.protocol import ChatCompletionRequest
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_tokens=17, max_completion_tokens=4)
    with pytest.raises(InvalidRequestError) as e:
        check_text_limits(req, req.max_new_tokens, limits())
    assert e.value.param == "max_tokens"


def test_text_limits():
    lim = limits(max_n=2, max_prompts=2, max_prompt_tokens=4, max_stop_sequences=1)
    for body, param in [({"prompt": "x", "n": 3}, "n"), ({"prompt": ["a", "b", "c"]}, "prompt"),
                        ({"prompt": [1, 2, 3, 4, 5]}, "prompt"), ({"prompt": "x", "stop": ["a", "b"]}, "stop"),
                        ({"prompt": "x", "max_tokens": 17}, "max_tokens")]:
        req = CompletionRequest(**body)
        with pytest.raises(InvalidRequestError) as e:
            check_text_limits(req, req.max_tokens, lim)
        assert e.value.param == param, body


@pytest.mark.parametrize("body", [{"prompt": [[False]]}, {"prompt": "x", "n": 1.0}, {"prompt": "x", "max_tokens": "2"},
                                  {"prompt": "x", "stream": "yes"}, {"prompt": "\ud800"},
                                  {"prompt": "x", "stop": ["ok", "\udfff"]}])
def test_requests_are_strict(body):
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        CompletionRequest(**body)


def test_image_request_rejects_surrogates_anywhere():
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        ImageGenerationRequest(prompt="ok", cache={"method": "\ud800"})
    assert _first_non_utf8({"a": [{"b": "fine"}, {"\ud800": 1}]}) == "a.1"


# ----------------------------------------------------------------------------- OpenAPI document and pins
def test_openapi_document_matches_the_errors():
    app = gate_app()
    install_openapi(app, frozenset({"/health"}))
    doc = app.openapi()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert "422" not in op["responses"] and "400" in op["responses"]
            assert ("401" in op["responses"]) == (path != "/health")
            assert ("security" in op) == (path != "/health")


def test_openapi_document_states_the_apps_limits_and_pipelines():
    from deployments.ingress import app as ingress_app
    from deployments.openapi_doc import apply_config

    cfg = omni_config()
    cfg.app.limits = limits(max_n=3, max_prompts=5, max_prompt_tokens=7, max_stop_sequences=2, max_images=2)
    doc = apply_config(copy.deepcopy(ingress_app.openapi()), cfg)
    s = doc["components"]["schemas"]

    def alts(schema, field, kind):
        p = s[schema]["properties"][field]
        return [a for a in p.get("anyOf", [p]) if a.get("type") == kind]

    for schema in ("CompletionRequest", "ChatCompletionRequest", "PipelineRequest"):
        assert [a["maximum"] for a in alts(schema, "max_tokens", "integer")] == [16]
        assert [a["maxItems"] for a in alts(schema, "stop", "array")] == [2]
    assert [a["maximum"] for a in alts("ChatCompletionRequest", "max_completion_tokens", "integer")] == [16]
    assert s["CompletionRequest"]["properties"]["n"]["maximum"] == 3
    for schema in ("ImageGenerationRequest", "PipelineRequest"):
        assert s[schema]["properties"]["n"]["maximum"] == 2
        assert [a["maximum"] for a in alts(schema, "num_inference_steps", "integer")] == [4]
    prompt = sorted((a["minItems"], a["maxItems"]) for a in alts("CompletionRequest", "prompt", "array"))
    assert prompt == [(1, 5), (1, 5), (1, 7)]
    assert [a["minLength"] for a in alts("CompletionRequest", "prompt", "string")] == [1]
    (name,) = doc["paths"]["/v1/pipelines/{name}"]["post"]["parameters"]
    assert name["schema"]["enum"] == sorted([*cfg.pipelines, "run"])
    assert "maximum" not in ingress_app.openapi()["components"]["schemas"]["CompletionRequest"]["properties"]["n"]


def test_pins_expire_and_respect_the_budget():
    now = [0.0]
    p = Pins(ttl_s=10, max_bytes=100, clock=lambda: now[0])
    p.hold("a", 40)
    p.hold("b", 40)
    assert len(p) == 2 and p.bytes == 80
    p.hold("c", 40)                       # over budget: the oldest goes
    assert len(p) == 2 and p.bytes == 80
    now[0] = 11
    p.prune()
    assert len(p) == 0 and p.bytes == 0


# ----------------------------------------------------------------------------- safe model loading
@pytest.fixture(scope="module")
def tiny_qwen3() -> Path:
    from omni_ray.models import resolve_model
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
    from omni_ray.models import resolve_model
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
