"""The protections without Ray: the Gate (keys, body size, stray exceptions), request limits and
stage_args checks, the OpenAPI document, pins, and safe model loading (pickle, remote code)."""

from __future__ import annotations

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


def test_valid_stage_args_pass_and_are_normalized():
    args = check("text2image", {"llm": {"max_tokens": 8, "stop": "x"}, "image": {"size": "64x32", "n": 2}})
    assert args.per_stage == {"llm": {"max_tokens": 8, "stop": ["x"]},
                              "image": {"height": 32, "width": 64, "num_images_per_prompt": 2}}


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


def test_dit_pickle_weights_refused_by_default(tmp_path):
    from omni_ray.dit.loader import _check_weights
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="pickle"):
        _check_weights(tmp_path, allow_pickle=False)
    _check_weights(tmp_path, allow_pickle=True)


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
