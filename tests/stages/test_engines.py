"""The stage-engine protocol: both adapters satisfy it, and behave through it on the tiny models
(the same calls a Serve stage replica and the offline OmniLLM make)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.config import ARStageConfig, DiTEngineConfig, LimitsConfig, ModelConfig, validate
from omni_ray.dit.params import DiffusionParams
from omni_ray.errors import InvalidRequestError, RequestCancelledError
from omni_ray.stages import ARRequest, DiTRequest, Handoff, StageEngine
from omni_ray.stages.ar import ARStageEngine
from omni_ray.stages.dit import DiTStageEngine

AR = validate(ARStageConfig, {"engine": {"model": {"path": "tiny:qwen3"}, "enforce_eager": True, "core_process": "off",
                                         "cache": {"block_size": 16, "num_blocks": 256}}}).engine


def test_both_adapters_are_stage_engines_and_other_things_are_not():
    assert isinstance(ARStageEngine(AR), StageEngine)
    assert isinstance(DiTStageEngine(DiTEngineConfig(model=ModelConfig(path="tiny:pixart"))), StageEngine)
    assert not isinstance(object(), StageEngine)

    class HalfEngine:                                    # generate without abort / health / shutdown
        async def generate(self, request):
            yield {}

    assert not isinstance(HalfEngine(), StageEngine)


def test_ar_stage_engine_generates_encodes_aborts():
    async def main():
        eng = ARStageEngine(AR, LimitsConfig(max_tokens=6, max_prompt_tokens=64))
        eng.start()
        eng.start()                                      # idempotent
        try:
            greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=1)
            req = ARRequest("a-1", prompt="the lighthouse", params=greedy, echo=True)
            deltas = [d async for d in eng.generate(req)]
            assert deltas[-1]["finished"] and sum(len(d["token_ids"]) for d in deltas) == 4
            for d in deltas:                                                   # asked for logprobs: one entry a token
                assert [e["id"] for e in d["logprobs"]] == d["token_ids"]
                assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in d["logprobs"])
            text = "".join(e["token"] for d in deltas for e in d["logprobs"])
            assert text == "".join(d["text"] for d in deltas)                # token texts, not BPE strings
            n_prompt = deltas[0]["num_prompt_tokens"]
            assert deltas[0]["prompt_text"] == "the lighthouse" and "prompt_text" not in deltas[-1]
            plp = deltas[0]["prompt_logprobs"]
            assert plp[0]["logprob"] is None and plp[0]["top_logprobs"] is None and len(plp) == n_prompt
            assert len(plp[1]["top_logprobs"]) == 1 and plp[1]["logprob"] <= 0
            assert "".join(e["token"] for e in plp) == "the lighthouse"
            fill = ARRequest("a-2", messages=[{"role": "user", "content": "hi"}],
                             params=SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))
            out = [d async for d in eng.generate(fill)]
            assert out[-1]["num_output_tokens"] == 6                  # None: up to the app's max_tokens cap
            hs = await eng.encode(ARRequest("a-3", prompt="a red fox", system_prompt="be brief", layer=-1))
            assert hs.dim() == 2 and hs.shape[1] == eng.engine.engine.arch.hidden_size
            with pytest.raises(InvalidRequestError) as e:           # the prompt-token limit, after tokenizing
                await eng.encode(ARRequest("a-4", prompt="word " * 200))
            assert e.value.param == "prompt" and "the limit is 64" in e.value.message
            long = eng.generate(ARRequest("a-5", prompt="x", params=SamplingParams(max_tokens=200, ignore_eos=True)))
            got = len((await long.__anext__())["token_ids"])
            eng.abort("a-5")
            eng.abort("no-such-request")                              # an unknown id does nothing
            async for d in long:                                       # the stream ends early
                got += len(d["token_ids"])
            assert got < 200
            for _ in range(500):
                stats = eng.stats()
                if stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]:
                    break
                await asyncio.sleep(0.01)
            eng.check_health()
            assert stats["healthy"] and stats["num_streams"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]
        finally:
            await eng.shutdown()

    asyncio.run(main())


def test_ar_stage_engine_streams_hidden_states():
    """``params.return_hidden_states``: each delta carries the [n, H] rows new since the previous one; merged
    deltas concatenate them; all of them equal the encoded prompt and fed reply. Offline (``OmniLLM``'s
    local stage) each delta's rows come as a Handoff by value."""
    from omni_ray.offline import _LocalAR
    from omni_ray.stages.ar import merge_deltas

    async def main():
        eng = ARStageEngine(AR, LimitsConfig())
        eng.start()
        try:
            params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, return_hidden_states=True)
            deltas = [d async for d in eng.generate(ARRequest("h-1", prompt="the lighthouse", params=params))]
            plain = [d async for d in eng.generate(ARRequest("h-2", prompt="the lighthouse"))]
            local = [d async for d in _LocalAR(eng).generate(ARRequest("h-3", prompt="the lighthouse", params=params))]
            ids = eng.tokenizer.encode("the lighthouse") + [t for d in deltas for t in d["token_ids"]][:-1]
            return deltas, plain, local, await eng.encode(ARRequest("h-4", prompt=ids)), ids
        finally:
            await eng.shutdown()

    deltas, plain, local, want, ids = asyncio.run(main())
    rows = [d["hidden_states"] for d in deltas if "hidden_states" in d]
    assert len(rows) > 1 and all(isinstance(r, torch.Tensor) and r.dtype == torch.float32 for r in rows)
    torch.testing.assert_close(torch.cat(rows), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(merge_deltas(deltas)["hidden_states"], want, atol=1e-5, rtol=0)
    assert all("prompt_positions" not in d for d in deltas)                  # a text prompt: no M-RoPE positions
    assert deltas[0]["prompt_token_ids"] == ids[:deltas[0]["num_prompt_tokens"]]    # whom the rows are of
    assert all("prompt_token_ids" not in d for d in deltas[1:] + plain)
    assert all("hidden_states" not in d for d in plain)                      # not asked: none
    handoffs = [d["hidden_states"] for d in local if "hidden_states" in d]
    assert all(isinstance(h, Handoff) and h.ref is None and h.shape == list(h.tensor.shape) for h in handoffs)
    joined = merge_deltas(local)["hidden_states"]
    assert isinstance(joined, Handoff) and joined.shape == list(want.shape)
    torch.testing.assert_close(joined.tensor, want, atol=1e-5, rtol=0)


def test_dit_stage_engine_generates_encodes_aborts():
    async def main():
        eng = DiTStageEngine(DiTEngineConfig(model=ModelConfig(path="tiny:pixart"), device="cpu"))
        eng.start()
        try:
            params = DiffusionParams(height=32, width=32, num_inference_steps=2, seed=0)
            evs = [e async for e in eng.generate(DiTRequest("d-1", prompt="a fox", params=params))]
            assert [e["kind"] for e in evs] == ["progress", "progress", "done"]
            assert evs[-1]["images"][0].size == (32, 32) and "seed" in evs[-1]["info"]
            embeds, mask = await eng.encode(DiTRequest("d-2", prompt="a fox"))
            assert embeds.dim() == 2 and mask.shape == embeds.shape[:1]
            again = DiTRequest("d-3", params=params, conditioning=Handoff(shape=list(embeds.shape), tensor=embeds))
            evs2 = [e async for e in eng.generate(again, embeds, mask)]
            assert torch.equal(torch.tensor(list(evs2[-1]["images"][0].getdata())),
                               torch.tensor(list(evs[-1]["images"][0].getdata())))   # same conditioning, same image
            slow = eng.generate(DiTRequest("d-4", prompt="a boat", params=DiffusionParams(
                height=32, width=32, num_inference_steps=50, seed=1)))
            await slow.__anext__()
            eng.abort("d-4")
            with pytest.raises(RequestCancelledError):
                async for _ in slow:
                    pass
            eng.check_health()
            assert eng.stats()["healthy"]
        finally:
            await eng.shutdown()

    asyncio.run(main())
