"""The asyncio API: one loop serves many callers in shared batches; abort; errors; health."""

import asyncio

import pytest
import torch
from PIL import Image

from omni_ray.config import DiTEngineConfig, ModelConfig
from omni_ray.dit import AsyncDiTEngine, DiffusionParams, DiTEvent
from omni_ray.errors import EngineError, InvalidRequestError, RequestCancelledError


def P(steps=4, seed=0, **kw):
    return DiffusionParams(height=32, width=32, num_inference_steps=steps, seed=seed, **kw)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncDiTEngine(DiTEngineConfig(model=ModelConfig(path="tiny:pixart"), device="cpu"))
    yield eng
    asyncio.run(eng.shutdown())


async def collect(engine, prompt, params, rid, **kw) -> list[DiTEvent]:
    return [ev async for ev in engine.generate(prompt, params, rid, **kw)]


def test_concurrent_callers_share_batches(engine):
    async def main():
        return await asyncio.gather(*[collect(engine, f"prompt {i}", P(steps=3 + i, seed=i), f"c{i}")
                                      for i in range(4)])

    s0 = engine.stats()["steps"]
    results = asyncio.run(main())
    st = engine.stats()
    for i, events in enumerate(results):
        progress, done = events[:-1], events[-1]
        assert [e.step for e in progress] == list(range(1, 4 + i)) and {e.total for e in progress} == {3 + i}
        assert done.kind == "done" and len(done.images) == 1 and isinstance(done.images[0], Image.Image)
        assert done.stats["seed"] == i and done.request_id == f"c{i}"
    assert st["steps"] - s0 < sum(3 + i for i in range(4))      # forwards were shared
    assert st["max_batch_size"] > 1 and st["active_requests"] == 0 and st["healthy"]


def test_llm_conditioned_through_async():
    async def main(eng):
        try:
            return await collect(eng, None, P(), "e1", prompt_embeds=torch.randn(6, 64),
                                 prompt_mask=torch.ones(6, dtype=torch.long))
        finally:
            await eng.shutdown()

    eng = AsyncDiTEngine(DiTEngineConfig(model=ModelConfig(path="tiny:pixart-llm"), device="cpu"))
    events = asyncio.run(main(eng))
    assert events[-1].kind == "done" and len(events[-1].images) == 1


def test_abort_frees_the_slot_and_ends_the_caller(engine):
    async def main():
        gen = engine.generate("a long one", P(steps=60), "long")
        seen = []
        other = asyncio.create_task(collect(engine, "a short one", P(steps=3), "short"))
        with pytest.raises(RequestCancelledError):
            async for ev in gen:
                seen.append(ev)
                if len(seen) == 2:
                    engine.abort("long")
        stats = engine.stats()
        return seen, stats, await other

    seen, stats, other = asyncio.run(main())
    assert len(seen) == 2
    assert stats["requests_aborted"] >= 1 and stats["active_requests"] <= 1    # only "short" may still run
    assert other[-1].kind == "done"
    assert engine.stats()["active_requests"] == 0 and "long" not in engine.engine.requests


def test_caller_that_walks_away_aborts(engine):
    async def main():
        gen = engine.generate("walk away", P(steps=50), "gone")
        async for _ in gen:
            break
        await gen.aclose()
        await asyncio.sleep(0.05)
        return engine.stats()

    a0 = engine.stats()["requests_aborted"]
    st = asyncio.run(main())
    assert st["requests_aborted"] == a0 + 1 and st["active_requests"] == 0


def test_bad_requests_fail_before_any_work(engine):
    async def main():
        with pytest.raises(InvalidRequestError) as err:
            await collect(engine, "a cat", P(steps=0), "bad1")
        assert err.value.param == "num_inference_steps"
        with pytest.raises(InvalidRequestError):
            await collect(engine, "a cat", DiffusionParams(height=31), "bad2")
        gen = engine.generate("a cat", P(steps=20), "same-id")
        await gen.__anext__()
        with pytest.raises(InvalidRequestError, match="already in use"):
            await collect(engine, "a dog", P(), "same-id")
        await gen.aclose()

    s0 = engine.stats()["steps"]
    asyncio.run(main())
    engine.check_health()
    assert engine.stats()["steps"] - s0 <= 2


def test_engine_failure_is_reported():
    async def main(eng):
        def broken():
            raise RuntimeError("GPU fell off the bus")
        eng.engine.step = broken
        with pytest.raises(EngineError):
            await collect(eng, "a cat", P(), "x")
        with pytest.raises(EngineError, match="loop died"):
            eng.check_health()
        await eng.shutdown()

    eng = AsyncDiTEngine(DiTEngineConfig(model=ModelConfig(path="tiny:pixart"), device="cpu"))
    asyncio.run(main(eng))


def test_encode_prompt_then_generate_from_embeddings(engine):
    async def main():
        embeds, mask = await engine.encode_prompt(["a red fox"])
        by_text = await collect(engine, "a red fox", P(seed=5), "t1")
        by_embeds = await collect(engine, None, P(seed=5), "t2", prompt_embeds=embeds[0], prompt_mask=mask[0])
        return by_text[-1].images[0], by_embeds[-1].images[0]

    a, b = asyncio.run(main())
    assert a.tobytes() == b.tobytes()
