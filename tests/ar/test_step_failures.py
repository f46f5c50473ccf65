"""An engine that one bad length or one failing step cannot wedge: ``max_model_len`` is clamped
to the model's positions, and an exception inside a step fails that step's requests with
``EngineError`` (blocks freed) while the engine, ``AsyncLLM`` and a Serve replica go on serving."""

from __future__ import annotations

import asyncio
import logging

import pytest

from omni_ray.ar import AsyncLLM, SamplingParams
from omni_ray.config import AREngineConfig
from omni_ray.errors import EngineError, InvalidRequestError, ProcessingError
from tests.ar.conftest import PROMPTS, make_llm

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def fail_once(monkeypatch, obj, name: str, after: int = 0) -> dict:
    """``obj.name`` raises RuntimeError on its call number ``after`` (0-based), once."""
    real, calls = getattr(obj, name), {"n": 0, "raised": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] - 1 == after:
            calls["raised"] += 1
            raise RuntimeError("injected device failure")
        return real(*a, **kw)

    monkeypatch.setattr(obj, name, flaky)
    return calls


def idle(llm) -> bool:
    bm = llm.block_manager
    return (llm.is_finished() and not llm.seqs and bm.num_free_blocks == bm.num_blocks
            and all(b.ref_count == 0 for b in bm.blocks))


# ----------------------------------------------------------------------------- max_model_len
def test_max_model_len_is_clamped_to_the_models_positions(caplog):
    with caplog.at_level(logging.WARNING, logger="omni_ray.ar.engine.llm_engine"):
        llm = make_llm(max_model_len=8192, num_kvcache_blocks=300)
    assert llm.max_model_len == llm.arch.max_position == 4096 == llm.config.scheduler.max_model_len
    assert "8192" in caplog.text and "4096" in caplog.text
    prompt = [10 + i % 1000 for i in range(4000)]                      # 4000 tokens
    with pytest.raises(InvalidRequestError) as err:                    # 4000 + 200 > 4096: refused up front
        llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=200))
    assert err.value.param == "max_tokens" and idle(llm)
    with pytest.raises(InvalidRequestError):
        llm.generate([prompt + prompt[:200]], GREEDY, use_tqdm=False)    # the prompt alone is too long
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=96, ignore_eos=True), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 96 and idle(llm)                # up to position 4095, the last one


def test_a_length_within_the_model_is_kept():
    assert make_llm(max_model_len=1000).max_model_len == 1000


# ----------------------------------------------------------------------------- offline engine
@pytest.mark.parametrize("where", ["run", "collect_decode"])
def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(monkeypatch, where):
    """``run``: a prefill forward; ``collect_decode``: an overlapped multi-step decode run (async_decode)."""
    llm = make_llm()
    want = [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    calls = fail_once(monkeypatch, llm.runner, where, after=1 if where == "collect_decode" else 0)
    with pytest.raises(EngineError, match="injected device failure") as err:
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert isinstance(err.value, ProcessingError) and calls["raised"] == 1
    assert idle(llm) and llm._inflight is None                         # blocks freed, nothing left behind
    assert [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want
    assert idle(llm)


def test_step_raises_for_the_failed_requests_only(monkeypatch):
    llm = make_llm()
    ok = llm.add_request(PROMPTS[0], GREEDY)
    llm.step()                                                         # ok is decoding now
    fail_once(monkeypatch, llm.runner, "run")
    bad = llm.add_request(PROMPTS[1], GREEDY)                          # joins: the next step mixes both
    with pytest.raises(EngineError) as err:
        llm.step()
    assert ok.request_id in str(err.value) and bad.request_id in str(err.value)
    assert ok.finish_reason == bad.finish_reason == "error" and idle(llm)
    again = llm.add_request(PROMPTS[1], GREEDY)
    while not llm.is_finished():
        llm.step()
    assert again.finish_reason == "length" and len(again.output_token_ids) == 12 and idle(llm)


def test_encode_after_a_failed_step(monkeypatch):
    llm = make_llm()
    want = llm.encode(PROMPTS[:2])
    fail_once(monkeypatch, llm.runner, "run")
    with pytest.raises(EngineError):
        llm.encode(PROMPTS[:2])
    assert idle(llm)
    got = llm.encode(PROMPTS[:2])
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(got, want))


# ----------------------------------------------------------------------------- AsyncLLM
def test_async_llm_fails_the_step_and_serves_the_next_request(monkeypatch):
    cfg = AREngineConfig.from_kwargs("tiny:qwen3", enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=256,
                                     max_model_len=512, core_process="off")
    engine = AsyncLLM(cfg)

    async def one(rid: str) -> list[int]:
        toks = []
        async for out in engine.generate(PROMPTS[0], GREEDY, rid):
            toks += out.token_ids
        return toks

    async def main():
        want = await one("warm")
        fail_once(monkeypatch, engine.engine.runner.model, "forward")
        results = await asyncio.gather(one("a"), one("b"), return_exceptions=True)
        assert all(isinstance(r, EngineError) for r in results), results
        engine.check_health()                                          # the loop is alive and healthy
        assert await one("c") == want
        st = engine.stats()
        assert st["num_free_blocks"] == st["num_blocks"] and st["num_streams"] == 0 and st["healthy"]

    try:
        asyncio.run(main())
    finally:
        engine.core.shutdown()


# ----------------------------------------------------------------------------- Serve replica
def test_serve_replica_fails_the_request_and_serves_the_next(monkeypatch):
    from deployments.stages.ar import ARDeployment
    from omni_ray.stages import ARRequest

    stage = {"engine": {"model": {"path": "tiny:qwen3"}, "enforce_eager": True, "core_process": "off",
                        "cache": {"block_size": 16, "num_blocks": 256}}}
    replica = ARDeployment.func_or_class("llm", stage)

    def req(rid: str) -> ARRequest:
        return ARRequest(rid, prompt=PROMPTS[2], params=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))

    async def main():
        want = await replica.complete(req("r0"))
        llm = replica.engine.engine                # the stage engine's AsyncLLM
        fail_once(monkeypatch, llm.engine.runner.model, "forward")    # whichever path steps it
        with pytest.raises(EngineError):
            await replica.complete(req("r1"))
        assert replica.health()["status"] == "ok"
        got = await replica.complete(req("r2"))
        assert got["token_ids"] == want["token_ids"] and len(got["token_ids"]) == 8
        st = replica.engine.stats()
        assert st["num_free_blocks"] == st["num_blocks"] and st["num_running"] == 0

    try:
        asyncio.run(main())
    finally:
        asyncio.run(replica.__del__())


def test_processing_error_is_the_base_of_engine_side_failures():
    from omni_ray import ProcessingError as exported
    from omni_ray.errors import CacheError, OmniError, ResourceError, SchedulerError

    assert exported is ProcessingError and issubclass(ProcessingError, OmniError)
    for cls in (EngineError, ResourceError, CacheError):
        assert issubclass(cls, ProcessingError)
    assert not issubclass(InvalidRequestError, ProcessingError) and not issubclass(SchedulerError, ProcessingError)
    assert (EngineError("x").http_status, EngineError("x").to_openai()["error"]["type"]) == (503, "engine_error")
    assert ProcessingError("x").to_openai()["error"]["type"] == "processing_error"
