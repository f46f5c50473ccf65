"""``async_decode``: a decode run of an unchanged batch is queued before the previous one is read.
The tokens must be exactly those of the engine without it, whatever ends or joins mid-flight:
lengths and stop tokens inside a run, requests that join, aborts, block boundaries."""

from omni_ray.ar import SamplingParams
from tests.ar.conftest import PROMPTS, make_llm


def engines(**kw):
    return make_llm(async_decode=False, **kw), make_llm(async_decode=True, **kw)


def tokens(llm, prompts, params):
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_same_tokens_with_lengths_ending_inside_runs(resumes):
    """Lengths 9..60 (none a multiple of the 4-step run), crossing 16-token blocks."""
    sync, overlap = engines()
    params = [SamplingParams(temperature=0, max_tokens=9 + 17 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    assert tokens(overlap, PROMPTS, params) == tokens(sync, PROMPTS, params)
    assert resumes["resumed"] >= 8
    assert overlap.is_finished() and overlap.block_manager.num_free_blocks == overlap.block_manager.num_blocks


def test_same_tokens_when_a_stop_token_ends_a_sequence_mid_flight(resumes):
    """A stop token (data-dependent, like EOS) ends a sequence inside a run while the next run,
    which still carries it, is already queued: that run's tokens for it are dropped."""
    sync, overlap = engines()
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = tokens(sync, PROMPTS, free)
    stop = ref[0][9]                                   # what the first prompt makes as its 10th token
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop])
    want = tokens(sync, PROMPTS, params)
    assert len(want[0]) == ref[0].index(stop) + 1 < 30
    assert tokens(overlap, PROMPTS, params) == want
    assert resumes["resumed"] > 0


def test_joins_and_aborts_between_steps_keep_every_other_stream_exact():
    """Requests that join while a run is in flight, and an abort of one that is in it."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = dict(zip(PROMPTS, tokens(make_llm(), PROMPTS, params)))
    llm = make_llm(async_decode=True)
    seqs = {}
    for i, p in enumerate(PROMPTS[:3]):
        llm.add_request(p, params, f"r{i}")
        seqs[i] = llm.seqs[f"r{i}"]
    for _ in range(3):
        llm.step()
    assert llm._inflight is not None                    # a run in flight when the others come
    for i, p in enumerate(PROMPTS[3:], start=3):
        llm.add_request(p, params, f"r{i}")
        seqs[i] = llm.seqs[f"r{i}"]
        llm.step()
    llm.step()
    llm.abort("r1")
    while not llm.is_finished():
        llm.step()
    assert seqs[1].finish_reason == "abort"
    assert seqs[1].output_token_ids == want[PROMPTS[1]][:len(seqs[1].output_token_ids)]
    for i, p in enumerate(PROMPTS):
        if i != 1:
            assert seqs[i].output_token_ids == want[p], i
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_runs_stop_resuming_at_max_model_len(resumes):
    """Sequences that end at max_model_len: no run is queued past it (its positions would leave
    the model's tables); the tokens equal the engine's without overlap."""
    sync, overlap = engines(max_model_len=48)
    params = [SamplingParams(temperature=0, max_tokens=48 - len(sync.tokenize(p)), ignore_eos=True)
              for p in PROMPTS[:3]]
    got, want = tokens(overlap, PROMPTS[:3], params), tokens(sync, PROMPTS[:3], params)
    assert got == want and [len(t) for t in got] == [p.max_tokens for p in params]
    assert resumes["resumed"] > 0


def test_serving_engine_streams_equal_offline_with_overlapped_runs():
    """``AsyncLLM`` with its core process on ``async_decode``: concurrent streams, one joining
    late, get the offline engine's tokens and text."""
    import asyncio

    from omni_ray.ar import AsyncLLM
    from omni_ray.config import AREngineConfig

    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = make_llm().generate(PROMPTS, params, use_tqdm=False)
    cfg = AREngineConfig.from_kwargs("tiny:qwen3", core_process="on", async_decode=True, enforce_eager=True,
                                     device="cpu", kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=512)
    eng = AsyncLLM(cfg)

    async def one(i, delay):
        await asyncio.sleep(delay)
        outs = [o async for o in eng.generate(PROMPTS[i], params, f"a{i}")]
        return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs)

    async def main():
        got = await asyncio.gather(*(one(i, 0.05 * (i == len(PROMPTS) - 1)) for i in range(len(PROMPTS))))
        await eng.shutdown()
        return got

    got = asyncio.run(main())
    assert [g[0] for g in got] == [w["token_ids"] for w in want]
    assert [g[1] for g in got] == [w["text"] for w in want]
