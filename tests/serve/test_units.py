"""Serve pieces without Ray: deployment options, request parsing, stream helpers, error mapping."""

import asyncio

import pytest

from deployments.ingress.http import as_omni, error_response
from deployments.openai.protocol import ChatCompletionRequest, CompletionRequest, ImageGenerationRequest
from deployments.options import stage_options
from deployments.streams import OpenStreams, cancellable, coalesce, merge
from omni_ray.config import ARStageConfig, DiTStageConfig, validate
from omni_ray.dit.params import parse_size
from omni_ray.errors import InvalidRequestError, QueueFullError, RequestCancelledError, RequestTimeoutError
from omni_ray.runner import StageArgs
from omni_ray.stages.ar import merge_deltas


def ar_stage(**kw) -> ARStageConfig:
    return validate(ARStageConfig, {"engine": {"model": {"path": "tiny:qwen3"}, **kw.pop("engine", {})}, **kw})


def test_options_single_rank():
    o = stage_options("llm", ar_stage(deployment={"num_replicas": 2, "num_cpus": 0.5, "num_gpus": 1,
                                                  "max_ongoing_requests": 7, "resources": {"ar_gpu": 1}}))
    assert o["name"] == "llm" and o["num_replicas"] == 2 and o["max_ongoing_requests"] == 7
    assert o["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1, "resources": {"ar_gpu": 1}}
    assert "placement_group_bundles" not in o
    # Serve's controller notices a crashed replica at its next check: 2 s by default (Serve's is 10 s)
    assert (o["health_check_period_s"], o["health_check_timeout_s"]) == (2.0, 30.0)


def test_options_tensor_parallel_bundles():
    o = stage_options("llm", ar_stage(engine={"device": "cuda", "parallel": {"tensor_parallel_size": 4,
                                                                            "placement_strategy": "PACK"}},
                                      deployment={"num_gpus": 1}))
    assert o["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1.0}] * 4
    assert o["placement_group_strategy"] == "PACK"
    assert o["ray_actor_options"]["num_gpus"] == 1.0          # the replica is rank 0, in bundle 0


def test_options_autoscaling_and_dit_ranks():
    dit = validate(DiTStageConfig, {"engine": {"model": {"path": "tiny:pixart"}, "device": "cpu",
                                               "parallel": {"cfg_parallel": True, "sequence_parallel_size": 2}},
                                    "deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}})
    o = stage_options("image", dit)
    assert "num_replicas" not in o and o["autoscaling_config"]["max_replicas"] == 3
    assert o["placement_group_bundles"] == [{"CPU": 1.0}] * 4   # cfg halves x 2 sequence ranks, CPU only


@pytest.mark.parametrize("size,hw", [("64x32", (32, 64)), ("auto", (None, None)), (None, (None, None))])
def test_parse_size(size, hw):
    assert parse_size(size) == hw


@pytest.mark.parametrize("size", ["64", "64x", "x64", "63x64", "0x0", "64X64"])
def test_parse_size_rejects(size):
    with pytest.raises(InvalidRequestError) as e:
        parse_size(size)
    assert e.value.param == "size"


def test_requests_parse():
    c = CompletionRequest(prompt=[1, 2, 3], stop="x", max_tokens=4, unknown_field=1)
    assert c.prompts() == [[1, 2, 3]] and c.stop == ["x"]
    chat = ChatCompletionRequest(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                             {"type": "text", "text": "b"}]}],
                                 max_completion_tokens=9)
    assert chat.chat_messages() == [{"role": "system", "content": "ab"}] and chat.max_new_tokens == 9
    img = ImageGenerationRequest(prompt="p", size="64x32", n=2, seed=3)
    assert img.diffusion() == {"height": 32, "width": 64, "seed": 3, "num_images_per_prompt": 2}
    with pytest.raises(ValueError):
        ImageGenerationRequest(prompt="x", response_format="url")


def test_logprob_fields_map_to_the_engine_params():
    p = CompletionRequest(prompt="x", logprobs=1, echo=True, max_tokens=0).to_sampling_params()
    assert (p.logprobs, p.prompt_logprobs, p.max_tokens) == (1, 1, 0)          # lm-eval's loglikelihood body
    p = CompletionRequest(prompt="x", logprobs=5).to_sampling_params()
    assert (p.logprobs, p.prompt_logprobs) == (5, None)
    msgs = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest(messages=msgs, logprobs=True, top_logprobs=20).to_sampling_params().logprobs == 20
    assert ChatCompletionRequest(messages=msgs, logprobs=True).to_sampling_params().logprobs == 0
    assert ChatCompletionRequest(messages=msgs).to_sampling_params().logprobs is None
    for body, param in ((CompletionRequest(prompt="x", logprobs=21), "logprobs"),
                        (ChatCompletionRequest(messages=msgs, logprobs=True, top_logprobs=21), "top_logprobs"),
                        (ChatCompletionRequest(messages=msgs, top_logprobs=2), "top_logprobs")):
        with pytest.raises(InvalidRequestError) as e:
            body.to_sampling_params()
        assert e.value.param == param


def _entry(i, tok, lp, raw, top=()):
    return {"id": i, "token": tok, "logprob": lp, "bytes": list(raw),
            "top_logprobs": None if top is None else [{"id": 9, "token": t, "logprob": x, "bytes": list(t.encode())}
                                                      for t, x in top]}


def test_completion_echo_and_logprobs_bodies():
    from deployments.openai.responses import Chat, Choice, Completion
    c = Choice(0)
    c.add({"text": "\u2014b", "token_ids": [5, 6, 7], "finished": True, "finish_reason": "length",
           "num_prompt_tokens": 2, "num_output_tokens": 3, "prompt_text": "Hi",
           "prompt_logprobs": [_entry(1, "H", None, b"H", None), _entry(2, "i", -2.0, b"i", [("o", -1.0)])],
           "logprobs": [_entry(5, "bytes:\\xe2\\x80", -0.5, b"\xe2\x80", [("a", -0.1)]),
                        _entry(6, "bytes:\\x94", -0.25, b"\x94", [("b", -0.2)]),
                        _entry(7, "b", -0.125, b"b", [("b", -0.125)])]})
    body = Completion("cmpl-1", "m", logprobs=True, echo=True).body([c], {})
    ch = body["choices"][0]
    assert ch["text"] == "Hi\u2014b"
    lp = ch["logprobs"]
    assert lp["tokens"] == ["H", "i", "bytes:\\xe2\\x80", "bytes:\\x94", "b"]
    assert lp["token_logprobs"] == [None, -2.0, -0.5, -0.25, -0.125]
    assert lp["top_logprobs"] == [None, {"i": -2.0, "o": -1.0}, {"bytes:\\xe2\\x80": -0.5, "a": -0.1},
                                  {"bytes:\\x94": -0.25, "b": -0.2}, {"b": -0.125}]
    assert lp["text_offset"] == [0, 1, 2, 2, 3]
    plain = Completion("cmpl-1", "m", logprobs=False, echo=False).body([c], {})["choices"][0]
    assert plain["text"] == "\u2014b" and plain["logprobs"] is None
    chat = Chat("chatcmpl-1", "m", logprobs=True).body([c], {})["choices"][0]["logprobs"]["content"]
    assert chat[0] == {"token": "bytes:\\xe2\\x80", "logprob": -0.5, "bytes": [0xE2, 0x80],
                       "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}]}


def test_stage_args_from_kwargs():
    a = StageArgs.from_kwargs({"max_tokens": 5, "size": "64x32", "seed": 1, "n": 2,
                               "stage_args": {"llm": {"top_p": 0.5}}})
    assert a.text == {"max_tokens": 5, "seed": 1}
    assert a.image == {"height": 32, "width": 64, "seed": 1, "num_images_per_prompt": 2}
    assert a.per_stage == {"llm": {"top_p": 0.5}}
    with pytest.raises(InvalidRequestError):
        StageArgs.from_kwargs({"bogus": 1})


def test_merge_deltas():
    def d(t, ids, fin):
        return {"text": t, "token_ids": ids, "logprobs": [{"id": i, "logprob": -1.0} for i in ids],
                "finished": fin, "finish_reason": "length" if fin else None,
                "num_prompt_tokens": 3, "num_output_tokens": 0}
    first = d("a", [1], False) | {"prompt_logprobs": [None, {"id": 7}], "prompt_text": "xy"}
    m = merge_deltas([first, d("b", [2, 3], True)])
    assert m["text"] == "ab" and m["token_ids"] == [1, 2, 3] and [e["id"] for e in m["logprobs"]] == [1, 2, 3]
    assert m["finished"] and m["finish_reason"] == "length"
    assert m["prompt_logprobs"] == [None, {"id": 7}] and m["prompt_text"] == "xy"


def test_merge_deltas_joins_hidden_state_rows():
    """Rows of a ``return_hidden_states`` stream: tensors concatenate, Handoffs join (by reference: the refs in
    order), positions and rope delta come from the first delta; nothing is dropped."""
    import torch

    from omni_ray.stages.requests import Handoff

    def d(n, **kw):
        return {"text": "", "token_ids": [n], "finished": False, "finish_reason": None, "num_prompt_tokens": 3,
                "num_output_tokens": n} | kw

    first = d(1, hidden_states=torch.ones(3, 2), prompt_positions=torch.zeros(3, 3), rope_delta=-2)
    m = merge_deltas([first, d(2), d(3, hidden_states=torch.full((1, 2), 2.0))])
    assert m["hidden_states"].tolist() == [[1.0, 1.0]] * 3 + [[2.0, 2.0]]
    assert m["rope_delta"] == -2 and m["prompt_positions"].shape == (3, 3)
    refs = [d(1, hidden_states=Handoff([3, 2], ref="r1", dtype="float32")),
            d(2, hidden_states=Handoff([2, 2], ref=["r2", "r3"], dtype="float32"))]
    h = merge_deltas(refs)["hidden_states"]
    assert h.shape == [5, 2] and h.refs == ["r1", "r2", "r3"] and h.tensor is None
    assert "rope_delta" not in merge_deltas(refs)


def test_error_mapping():
    r = error_response(QueueFullError("busy", retry_after=2.4))
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert as_omni(ValueError("x")).http_status == 500


async def _gen(n, log):
    try:
        for i in range(n):
            await asyncio.sleep(0.001)
            yield i
    finally:
        log.append("closed")


def test_cancellable_stops_the_source():
    async def main():
        log, ev = [], asyncio.Event()
        got = []
        with pytest.raises(RequestCancelledError):
            async for x in cancellable(_gen(10_000, log), ev):
                got.append(x)
                if x == 3:
                    ev.set()
        assert got[:4] == [0, 1, 2, 3] and log == ["closed"]
        with pytest.raises(RequestTimeoutError):
            async for _ in cancellable(_gen(10_000, log), None, timeout_s=0.01):
                pass
        assert log == ["closed", "closed"]
        assert [x async for x in cancellable(_gen(3, log), asyncio.Event())] == [0, 1, 2]

    asyncio.run(main())


def test_merge_interleaves_and_closes():
    async def main():
        log = []
        out = [x async for x in merge([(0, _gen(2, log)), (1, _gen(3, log))])]
        assert sorted(out) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)] and log == ["closed", "closed"]
        log.clear()
        agen = merge([(0, _gen(100, log)), (1, _gen(100, log))])
        await agen.__anext__()
        await agen.aclose()
        assert log == ["closed", "closed"]

    asyncio.run(main())


def test_coalesce_sends_the_end_at_once():
    """What waits for the interval goes as soon as the source ends, with its last items (a stream's
    last tokens, usage and [DONE] do not wait out the interval)."""
    async def source():
        yield "a"
        await asyncio.sleep(0.005)
        yield "b"
        yield "c"

    async def main():
        loop = asyncio.get_running_loop()
        t0, out = loop.time(), []
        async for batch in coalesce(source(), "".join, interval_s=1.0):
            out.append((loop.time() - t0, batch))
        return out

    out = asyncio.run(main())
    assert [b for _, b in out] == ["a", "bc"] and out[1][0] < 0.5, out


def test_coalesce_sends_first_at_once_then_merges_per_interval():
    async def main():
        log = []
        # 200 items 1 ms apart, 50 ms interval: the first alone, then ~5 merged messages, nothing lost
        t0 = asyncio.get_running_loop().time()
        out = []
        async for batch in coalesce(_gen(200, log), lambda xs: xs, interval_s=0.05):
            out.append((asyncio.get_running_loop().time() - t0, batch if isinstance(batch, list) else [batch]))
        assert out[0][1] == [0] and out[0][0] < 0.05
        assert [x for _, b in out for x in b] == list(range(200)) and log == ["closed"]
        assert 2 <= len(out) <= 12, [len(b) for _, b in out]
        gaps = [b - a for (a, _), (b, _) in zip(out[1:-2], out[2:-1])]     # the last goes when the source ends
        assert all(g >= 0.045 for g in gaps), gaps
        # no interval: the consumer gets every item while it keeps up
        assert [x async for x in coalesce(_gen(5, log), lambda xs: xs)] == [0, 1, 2, 3, 4]
        # stopping the consumer closes the source
        agen = coalesce(_gen(10_000, log), lambda xs: xs, interval_s=0.01)
        await agen.__anext__()
        await agen.aclose()
        assert log == ["closed", "closed", "closed"]

    asyncio.run(main())


def test_stream_interval_grows_with_open_streams():
    from omni_ray.config import StreamingConfig

    cfg = StreamingConfig(min_interval_s=0.01, messages_per_s=100, max_interval_s=0.2)
    assert [cfg.interval(n) for n in (0, 1, 5, 64)] == [0.01, 0.01, 0.05, 0.2]
    streams = OpenStreams(cfg)
    seen = []

    async def main():
        async def src():
            for i in range(3):
                seen.append(streams.count)
                yield i
        return [x async for x in streams.stream(src(), lambda xs: xs)]

    out = asyncio.run(main())
    assert [x for b in out for x in (b if isinstance(b, list) else [b])] == [0, 1, 2]
    assert seen == [1, 1, 1] and streams.count == 0


def test_pinned_router_sends_a_call_with_a_replica_to_that_replica():
    from types import SimpleNamespace as NS

    from deployments.stages.routing import PinnedRouter

    replicas = [NS(replica_id=NS(unique_id=u)) for u in ("a", "b", "c")]
    pending = NS(kwargs={"replica": "b"})
    chosen = asyncio.run(PinnedRouter.choose_replicas(object(), replicas, pending))
    assert chosen == [[replicas[1]]]


def test_fan_in_hands_streams_on_together_and_isolates_errors():
    from deployments.stages.batch import fan_in

    async def ok(n, log):
        try:
            for i in range(n):
                yield i
                await asyncio.sleep(0)
        finally:
            log.append(n)

    async def bad():
        yield "x"
        raise ValueError("boom")

    async def main():
        log = []
        got = [items async for items in fan_in([ok(2, log), bad(), ok(3, log)], "r1", lambda e: RuntimeError(str(e)))]
        assert got[0][0] == (-1, {"replica": "r1"})                  # the replica id rides with the first items
        ends = [i for items in got for i, d in items if d is None]
        assert sorted(ends) == [0, 1, 2] and sorted(log) == [2, 3]
        errs = [d for items in got for i, d in items if isinstance(d, Exception)]
        assert len(errs) == 1 and isinstance(errs[0], RuntimeError) and str(errs[0]) == "boom"
        calls = fan_in([ok(10_000, log)], "r1", RuntimeError)
        await calls.__anext__()
        await calls.aclose()                                          # closing cancels every stream
        assert log[-1] == 10_000

    asyncio.run(main())
