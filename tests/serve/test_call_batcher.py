"""Batched AR stage calls without Ray: the ingress's StreamBatcher against the AR replica's own
``generate_batch`` / ``abort`` (the replica class run in-process on the tiny Qwen3; the fake handle
stands where Serve routes the calls)."""

import asyncio

import pytest

from deployments.ingress.call_batcher import StreamBatcher
from deployments.stages.ar import ARDeployment
from omni_ray.ar import LLM, SamplingParams
from omni_ray.errors import InvalidRequestError
from omni_ray.stages import ARRequest
from tests.helpers import FakeCall

STAGE = {"engine": {"model": {"path": "tiny:qwen3"}, "enforce_eager": True, "core_process": "off",
                    "cache": {"block_size": 16, "num_blocks": 256}}}
PROMPTS = ["the lighthouse keeper", "a message in a bottle", "waves", "the north wind", "at dusk", "gulls"]



class FakeComplete:
    def __init__(self, replica, calls):
        self.replica, self.calls = replica, calls

    def remote(self, req):
        self.calls.append(([req], "complete"))
        task = asyncio.ensure_future(self.replica.complete(req))
        task.cancel_call = task.cancel
        return task


class FakeGenerate:
    def __init__(self, replica, calls):
        self.replica, self.calls = replica, calls

    def remote(self, req):
        call = FakeCall(self.replica.generate(req))
        self.calls.append(([req], "generate", call))
        return call


class FakeHandle:
    def __init__(self, replica):
        self.replica, self.calls, self.aborts = replica, [], []
        self.generate_batch = self.abort = self
        self.complete = FakeComplete(replica, self.calls)
        self.generate = FakeGenerate(replica, self.calls)

    def remote(self, *args, **kw):
        if kw:                                        # abort(ids, replica=...)
            self.aborts.append((args[0], kw["replica"]))
            assert kw["replica"] == self.replica.replica  # the router's pin names the right replica
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(self.replica.abort(*args, **kw))
            return fut
        call = FakeCall(self.replica.generate_batch(*args))
        self.calls.append((args[0], call, args[1]))          # (requests, call, the indices paced as unary)
        return call


@pytest.fixture(scope="module")
def replica():
    r = ARDeployment.func_or_class("llm", STAGE)
    yield r
    asyncio.run(r.__del__())          # Serve's shutdown hook: stops the metrics sampling thread too


@pytest.fixture(scope="module")
def expected():
    llm = LLM("tiny:qwen3", enforce_eager=True, num_kvcache_blocks=256, kvcache_block_size=16)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    return [o["token_ids"] for o in outs]


def req(i: int, max_tokens: int = 12, prompt: str | None = None) -> ARRequest:
    return ARRequest(f"b{i}-{max_tokens}", prompt=prompt or PROMPTS[i],
                     params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def collect(batcher, r, stop_after: int | None = None) -> list[int]:
    toks, n = [], 0
    async for d in batcher.stream(r):
        toks += d["token_ids"]
        n += 1
        if stop_after is not None and n >= stop_after:
            break
    return toks


def run(coro):
    return asyncio.run(coro)


def test_a_burst_shares_one_call_and_each_gets_its_own_tokens(replica, expected):
    async def main():
        h = FakeHandle(replica)
        b = StreamBatcher(h, h, max_batch=16)
        got = await asyncio.gather(*(collect(b, req(i)) for i in range(len(PROMPTS))))
        return h, got

    h, got = run(main())
    assert len(h.calls) == 1 and len(h.calls[0][0]) == len(PROMPTS)
    assert got == expected


def test_lone_requests_go_alone_and_max_batch_splits_a_burst(replica, expected):
    async def main():
        h = FakeHandle(replica)
        b = StreamBatcher(h, h, max_batch=4)
        first = await collect(b, req(0))
        burst = await asyncio.gather(*(collect(b, req(i)) for i in range(len(PROMPTS))))
        return h, first, burst

    h, first, burst = run(main())
    assert [len(c[0]) for c in h.calls] == [1, 4, 2]
    assert h.calls[0][1] == "generate"                  # the lone one: a plain generate call
    assert first == expected[0] and burst == expected


def test_a_lone_caller_that_leaves_cancels_its_call(replica):
    async def main():
        h = FakeHandle(replica)
        b = StreamBatcher(h, h)
        part = await collect(b, req(3, max_tokens=400), stop_after=1)
        for _ in range(50):
            if replica.engine.stats()["num_streams"] == 0:
                break
            await asyncio.sleep(0.05)
        return h, part, replica.engine.stats()

    h, part, stats = run(main())
    assert h.calls[0][1] == "generate" and h.calls[0][2].cancelled and 0 < len(part) < 400
    assert stats["num_streams"] == 0 and stats["num_running"] == 0


def test_a_bad_request_fails_alone(replica, expected):
    async def main():
        h = FakeHandle(replica)
        b = StreamBatcher(h, h)
        bad = req(1, prompt="x " * 5000)                  # longer than the model's context
        return await asyncio.gather(collect(b, req(0)), collect(b, bad), collect(b, req(2)),
                                    return_exceptions=True)

    good0, err, good2 = run(main())
    assert isinstance(err, InvalidRequestError)
    assert good0 == expected[0] and good2 == expected[2]


def test_a_caller_that_leaves_aborts_only_its_request(replica, expected):
    async def main():
        h = FakeHandle(replica)
        b = StreamBatcher(h, h)
        long = req(1, max_tokens=400)
        res = await asyncio.gather(collect(b, req(0)), collect(b, long, stop_after=1), collect(b, req(2)))
        for _ in range(50):                               # the abort is sent in the background
            if h.aborts and replica.engine.stats()["num_streams"] == 0:
                break
            await asyncio.sleep(0.05)
        return h, res, replica.engine.stats()

    h, (a, partial, c), stats = run(main())
    assert h.aborts == [([req(1, 400).request_id], replica.replica)]
    assert a == expected[0] and c == expected[2] and 0 < len(partial) < 400
    assert stats["num_streams"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0


def test_when_every_caller_leaves_the_call_is_cancelled(replica):
    async def main():
        h = FakeHandle(replica)
        b = StreamBatcher(h, h)
        await asyncio.gather(*(collect(b, req(i, max_tokens=400), stop_after=1) for i in range(3)))
        for _ in range(200):       # the engine frees aborted sequences at its next step: on a loaded CI box, later
            st = replica.engine.stats()
            if st["num_streams"] == 0 and st["num_running"] == 0:
                break
            await asyncio.sleep(0.05)
        return h, replica.engine.stats()

    h, stats = run(main())
    assert len(h.calls) == 1 and h.calls[0][1].cancelled     # the last to leave cancels the call
    assert len(h.aborts) == 2                                 # the first two are aborted one by one
    assert stats["num_streams"] == 0 and stats["num_running"] == 0


def test_unary_requests_batch_in_a_burst_and_go_alone_otherwise(replica, expected):
    async def main():
        h = FakeHandle(replica)
        b = StreamBatcher(h, h)
        lone = await b.complete(req(0))
        burst = await asyncio.gather(*(b.complete(req(i)) for i in range(len(PROMPTS))))
        return h, lone, burst

    h, lone, burst = run(main())
    assert h.calls[0][1] == "complete" and len(h.calls) == 2 and len(h.calls[1][0]) == len(PROMPTS)
    assert h.calls[1][2] == list(range(len(PROMPTS)))          # every one paced like ``complete``
    assert lone["token_ids"] == expected[0] and lone["finished"] and lone["replica_s"] > 0
    assert [o["token_ids"] for o in burst] == expected
    assert all(o["finished"] and o["replica_s"] > 0 and o["num_output_tokens"] == 12 for o in burst)


def test_the_step_log_times_a_burst_from_the_ingress_to_the_engine(tmp_path):
    """With ``engine.step_log`` the replica logs each batched call beside the engine's steps (when
    the ingress sent it, when it arrived), and ``benchmarks/step_log.py`` reads the burst back:
    one call, every request taken in by the engine, no step before the call arrived."""
    import json
    import time

    from benchmarks.step_log import engine_timeline

    path = tmp_path / "steps.jsonl"
    stage = {**STAGE, "engine": {**STAGE["engine"], "step_log": str(path)}}
    r = ARDeployment.func_or_class("llm", stage)
    wall0 = time.time()

    async def main():
        h = FakeHandle(r)
        b = StreamBatcher(h, h, max_batch=16)
        got = await asyncio.gather(*(collect(b, req(i, 6)) for i in range(4)))
        await r.__del__()                   # Serve's shutdown hook: a coroutine, once
        assert r.__del__() is None          # the collector's later call starts nothing
        return got

    got = run(main())
    assert all(len(t) == 6 for t in got)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    kinds = [next(k for k in ("dt", "call", "lag") if k in x) for x in lines]
    steps = [x for x in lines if "dt" in x]
    assert kinds.count("call") == 1 and sum(s["added"] for s in steps) == 4
    assert sum(s["decodes"] * s["forwards"] for s in steps) >= 4 * 5     # tokens 2..6 from decode forwards
    call = lines[kinds.index("call")]
    assert call["call"] == 4 and wall0 <= call["sent"] <= call["t"]
    tl = engine_timeline(str(path), wall0, 4, time.time())
    assert tl["stage_calls"] == 1 and tl["requests_per_call"] == 4
    assert tl["ingress_sent_ms"][0] <= tl["replica_got_ms"][0] <= tl["engine_got_requests_ms"][0]
    assert tl["steps"] == len(steps) and tl["core_gc_ms"]["steps"] <= tl["steps"]
