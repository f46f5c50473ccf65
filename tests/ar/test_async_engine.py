"""AsyncLLM on both engine cores (a thread of this process, a child process): the same tokens as the
offline engine under concurrency, hidden states, bad input isolated, abort freeing blocks, a dead
core process failing its requests."""

from __future__ import annotations

import asyncio
import math
import os
import signal

import pytest
import torch

from omni_ray.ar import LLM, AsyncLLM, SamplingParams
from omni_ray.config import AREngineConfig
from omni_ray.errors import EngineError, InvalidRequestError
from tests.ar.conftest import PROMPTS

ARGS = dict(enforce_eager=True, device="cpu", kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=512)


def config(core: str) -> AREngineConfig:
    return AREngineConfig.from_kwargs("tiny:qwen3", core_process=core, **ARGS)


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny:qwen3", **ARGS)


@pytest.fixture(scope="module", params=["off", "on"], ids=["thread-core", "process-core"])
def engine(request):
    eng = AsyncLLM(config(request.param))
    assert (eng.engine is None) == (request.param == "on")
    yield eng
    asyncio.run(eng.shutdown())


async def collect(eng, prompt, params, rid):
    outs = [o async for o in eng.generate(prompt, params, rid)]
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1]


def test_concurrent_requests_equal_offline(engine, offline):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = offline.generate(PROMPTS, params, use_tqdm=False)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params, f"eq-{i}") for i, p in enumerate(PROMPTS)))

    got = asyncio.run(main())
    for (ids, text, last), w in zip(got, want):
        assert ids == w["token_ids"] and text == w["text"]
        assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 24
    assert engine.stats()["max_batch_size"] > 1


def test_slow_and_paced_callers_get_merged_outputs(engine, offline):
    """A caller that falls behind gets everything new in one output (no backlog), and ``interval``
    paces outputs; either way the tokens and text equal the offline engine's, logprobs included."""
    params = lambda: SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0)  # noqa: E731
    want = offline.generate(PROMPTS[:2], params(), use_tqdm=False)

    async def slow(prompt, rid):
        outs = []
        async for o in engine.generate(prompt, params(), rid):
            outs.append(o)
            await asyncio.sleep(0.15)                  # the engine makes several steps meanwhile
        return outs

    async def paced(prompt, rid, interval):
        outs, times = [], []
        async for o in engine.generate(prompt, params(), rid, interval=interval):
            outs.append(o)
            times.append(asyncio.get_running_loop().time())
        gaps = [b - a for a, b in zip(times[:-2], times[1:-1])]       # the last output does not wait
        assert all(g >= 0.0049 for g in gaps), gaps                  # ticks of 10 ms, at least half of one apart
        ticks = [math.floor(t / 0.01 + 1e-6) for t in times[1:-1]]   # after the first: one per tick at most
        assert len(set(ticks)) == len(ticks), times
        return outs

    async def main():
        return await asyncio.gather(slow(PROMPTS[0], "slow-0"), paced(PROMPTS[1], "paced-1", math.inf),
                                    paced(PROMPTS[0], "paced-0", lambda: 0.01))

    slow_outs, inf_outs, paced_outs = asyncio.run(main())
    for outs, w in ((slow_outs, want[0]), (inf_outs, want[1]), (paced_outs, want[0])):
        assert [t for o in outs for t in o.token_ids] == w["token_ids"]
        assert "".join(o.text for o in outs) == w["text"]
        assert sum(len(o.logprobs) for o in outs) == 40 and outs[-1].finished
        assert all(not o.finished for o in outs[:-1])
    assert len(slow_outs) < 40 and max(len(o.token_ids) for o in slow_outs) > 1
    # the first output as soon as the caller runs (with what the engine made before it did: with the
    # engine in a thread of this process, a few steps), then the rest at the end
    assert len(inf_outs) == 2 and len(inf_outs[0].token_ids) < 20
    assert len(paced_outs) > 2


def test_encode_equals_offline_hidden_states(engine, offline):
    from omni_ray.ar import EncodeParams

    want = offline.generate([PROMPTS[0]], EncodeParams(), use_tqdm=False)[0]["hidden_states"]
    got = asyncio.run(engine.encode(PROMPTS[0], "enc-0"))
    assert isinstance(got, torch.Tensor) and got.shape == want.shape
    torch.testing.assert_close(got, want)


def test_hidden_states_stream_and_merge(engine, offline):
    """``return_hidden_states``: every output carries the rows new since the previous one (numpy across the
    child process's pipe, a float32 tensor here); merged outputs (``interval``) concatenate them. All rows
    equal the offline engine's; a request beside it without the flag gets none."""
    params = lambda hidden=True: SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,  # noqa: E731
                                                return_hidden_states=hidden)
    want = offline.generate(PROMPTS[:2], params(), use_tqdm=False)

    async def main():
        return await asyncio.gather(*(
            asyncio.gather(*[_outs(engine, p, params(), f"hid-{i}-{j}", interval) for i, p in enumerate(PROMPTS[:2])])
            for j, interval in enumerate((None, math.inf))), _outs(engine, PROMPTS[2], params(False), "hid-off"))

    each, merged, off = asyncio.run(main())
    for outs, w in zip(each + merged, want * 2):
        assert all(isinstance(o.hidden_states, torch.Tensor) and o.hidden_states.dtype == torch.float32
                   for o in outs)
        torch.testing.assert_close(torch.cat([o.hidden_states for o in outs]), w["hidden_states"], atol=1e-5, rtol=0)
        assert [t for o in outs for t in o.token_ids] == w["token_ids"]
    # paced (interval inf): the first output, then the rest merged; unpaced: at least that (a caller slower than the
    # engine gets what it has not taken yet merged, by design, so how many depends on the machine's load)
    assert all(len(o) >= 2 for o in each) and all(len(o) == 2 for o in merged)
    assert all(o.hidden_states is None and o.prompt_positions is None for o in off)


async def _outs(eng, prompt, params, rid, interval=None):
    return [o async for o in eng.generate(prompt, params, rid, interval=interval)]


def test_bad_request_fails_alone(engine):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def main():
        good = asyncio.ensure_future(collect(engine, PROMPTS[1], params, "ok-1"))
        with pytest.raises(InvalidRequestError, match="empty"):
            await collect(engine, "", params, "bad-1")
        with pytest.raises(InvalidRequestError, match="vocab"):
            await collect(engine, [10 ** 9], params, "bad-2")
        ids, _, last = await good
        return ids, last

    ids, last = asyncio.run(main())
    assert len(ids) == 8 and last.finish_reason == "length"


def test_abort_returns_every_block(engine):
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main():
        agen = engine.generate(PROMPTS[3], params, "abort-1")
        await agen.__anext__()
        await agen.aclose()                       # the caller goes away mid-stream
        for _ in range(500):
            s = engine.stats()
            if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_blocks"]:
                return s
            await asyncio.sleep(0.01)
        return engine.stats()

    s = asyncio.run(main())
    assert s["num_free_blocks"] == s["num_blocks"] and s["num_streams"] == 0 and s["num_running"] == 0


def test_dead_core_process_fails_requests_and_reports_unhealthy():
    eng = AsyncLLM(config("on"))
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main():
        task = asyncio.ensure_future(_drain(eng.generate(PROMPTS[0], params, "dies-1")))
        await asyncio.sleep(0.05)                 # submitted, far from its 400 tokens
        os.kill(eng.core.proc.pid, signal.SIGKILL)
        with pytest.raises(EngineError, match="exited"):
            await asyncio.wait_for(task, timeout=30)
        with pytest.raises(EngineError):
            eng.check_health()
        with pytest.raises(EngineError):
            await collect(eng, PROMPTS[1], params, "after-1")
        await eng.shutdown()

    asyncio.run(main())
    assert eng.stats()["healthy"] is False


async def _drain(agen):
    async for _ in agen:
        await asyncio.sleep(0.05)                 # slow reader: the kill lands mid-stream


def test_pending_outputs_merge_and_an_error_stays_last():
    from omni_ray.ar.engine.async_engine import _Stream
    from omni_ray.ar.engine.engine_core import RequestOutput

    async def main():
        s, loop = _Stream(), asyncio.get_running_loop()
        s.put(RequestOutput("r", "a", [1], None, False, None, 3, 1))
        s.put(RequestOutput("r", "b", [2], None, False, None, 3, 2))
        first = await s.take(0.0, loop)
        s.put(RequestOutput("r", "c", [3], None, False, None, 3, 3))
        s.put(EngineError("boom"))
        s.put(RequestOutput("r", "d", [4], None, True, "length", 3, 4))
        err = await s.take(loop.time() + 60, loop)                # an error does not wait for the pace
        p = _Stream()
        p.put(RequestOutput("r", "x", [5], None, False, None, 3, 1))
        waiter = asyncio.ensure_future(p.take(loop.time() + 60, loop))
        await asyncio.sleep(0)
        p.put(RequestOutput("r", "y", [6], None, False, None, 3, 2))
        woken = p.ready.is_set()                                   # pacing: merged, nobody woken
        p.put(RequestOutput("r", "z", [7], None, True, "length", 3, 3))
        return first, err, woken, await asyncio.wait_for(waiter, 5)

    first, last, woken, paced = asyncio.run(main())
    assert (first.text, first.token_ids, first.num_output_tokens) == ("ab", [1, 2], 2)
    assert isinstance(last, EngineError)
    assert not woken and (paced.text, paced.token_ids, paced.finished) == ("xyz", [5, 6, 7], True)


def test_step_log_records_each_step_and_the_requests_it_took_in(tmp_path):
    """``step_log``: the child process appends one JSON line per step; the requests added add up,
    the forwards cover the tokens made (multi-step decode runs are one line each); the serving
    process adds a line each time it sends new requests on to the core, before the core takes them."""
    import json
    import time

    path = tmp_path / "steps.jsonl"
    eng = AsyncLLM(config("on").model_copy(update={"step_log": str(path)}))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    t0 = time.time()

    async def main():
        await asyncio.gather(*(collect(eng, p, params, f"log-{i}") for i, p in enumerate(PROMPTS)))
        await eng.shutdown()

    asyncio.run(main())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    steps, sends = [x for x in lines if "dt" in x], [x for x in lines if "flush" in x]
    assert len(steps) + len(sends) == len(lines)
    assert sum(s["added"] for s in steps) == len(PROMPTS) == sum(x["flush"] for x in sends)
    assert sends[0]["t"] <= steps[0]["t"]
    assert all(t0 <= s["t"] <= time.time() and s["dt"] > 0 for s in steps)
    assert steps[0]["added"] >= 1 and steps[0]["tokens"] > steps[0]["decodes"]   # prompt tokens first
    assert max(s["seqs"] for s in steps) > 1
    # every sequence's 12 tokens: one per prefill that ends its prompt, the rest from decode forwards
    assert sum(s["decodes"] * s["forwards"] for s in steps) >= len(PROMPTS) * (12 - 1) - len(PROMPTS) * 3


def test_a_loop_closed_before_its_queued_sends_ran_loses_no_later_request():
    """Adds and aborts go to the core process once per loop turn; a loop that closes with that
    send still scheduled must not leave the next loop's requests waiting forever."""
    eng = AsyncLLM(config("on"))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    old = asyncio.new_event_loop()
    eng.core.start(old, eng._deliver, eng._fail_all)
    eng._loop = old
    eng.core.abort("nobody")                       # a send scheduled on ``old``, which never runs
    old.close()

    async def main():
        out = await asyncio.wait_for(collect(eng, PROMPTS[0], params, "after-close"), timeout=60)
        await eng.shutdown()
        return out

    ids, _, last = asyncio.run(main())
    assert len(ids) == 4 and last.finished


def test_core_sends_inline_give_the_same_outputs(offline):
    """``core_send_thread: false``: the core process sends each step's outputs itself; the
    streams are the same as with the sender thread (and as offline)."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = offline.generate(PROMPTS, params, use_tqdm=False)
    eng = AsyncLLM(config("on").model_copy(update={"core_send_thread": False}))

    async def main():
        got = await asyncio.gather(*(collect(eng, p, params, f"inline-{i}") for i, p in enumerate(PROMPTS)))
        await eng.shutdown()
        return got

    for (ids, text, last), w in zip(asyncio.run(main()), want):
        assert ids == w["token_ids"] and text == w["text"] and last.finished


def test_offline_engine_writes_the_same_step_log(tmp_path):
    """The step log is the engine's own: ``LLM.generate`` writes it too (the offline baseline's
    steps, beside the served ones)."""
    import json

    path = tmp_path / "offline.jsonl"
    llm = LLM("tiny:qwen3", step_log=str(path), **ARGS)
    llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    steps = [json.loads(line) for line in path.read_text().splitlines()]
    assert sum(s["added"] for s in steps) == len(PROMPTS) and steps[0]["added"] == len(PROMPTS)
    assert steps[0]["seqs"] == len(PROMPTS) and steps[-1]["decodes"] == steps[-1]["seqs"]
