"""A low-latency first chunk for the streamed token2wav (``token2wav_stream`` in the DiT engine config):
the plan's windows, its splicing, its audio against the reference plan's and the whole utterance's,
and the stage's use of it.

With ``first_chunk_frames`` 24 and no look-ahead, chunk 0 owns frames [0, 24) and runs on the window
[0, 24) once 12 codes exist (the reference: 48 codes); chunk 1 owns [24, 72) and runs on the reference's
first window [0, 96); every later chunk is the reference's. So the audio equals the reference plan's from
frame 52 on (chunk 2's piece: vocoded after frames [32, 72), all of chunk 1's reference mel), and only the
first 52 frames (0.52 s) differ. Measured on this tiny checkpoint (2 layers, 3 time points): against the
whole-utterance synthesis, max |diff| 2.0e-2 on a waveform of rms 0.14, relative rms 1.65e-2 in those
frames and 9.6e-3 over the 1.6 s utterance (the reference plan: 2.7e-4); the bounds below leave ~2x room.
A splice off by one frame would give differences of the signal's own size over the whole utterance.
"""

import asyncio

import numpy as np
import pytest
import torch

from omni_ray.config import Token2WavStreamConfig
from omni_ray.dit import DiffusionParams, SpeechInput
from omni_ray.dit.token2wav_chunks import ChunkPlan, SpeechStream, stream_noise, synthesize_chunked
from omni_ray.errors import ConfigError
from tests.dit.conftest import make_engine
from tests.dit.omni_token2wav_utils import random_codes

HOP = 240
LOW = Token2WavStreamConfig(first_chunk_frames=24, first_lookahead_frames=0)


@pytest.fixture(scope="module")
def engine(token2wav_ckpt):
    return make_engine(str(token2wav_ckpt))


def test_the_plans_windows(engine):
    fam = engine.family
    ref, low = ChunkPlan.for_family(fam), ChunkPlan.for_family(fam, LOW)
    same = ChunkPlan.for_family(fam, Token2WavStreamConfig(first_chunk_frames=72, first_lookahead_frames=24))
    assert [same.window(i, 400) for i in range(6)] == [ref.window(i, 400) for i in range(6)]
    assert [same.codes_needed(i) for i in range(5)] == [ref.codes_needed(i) for i in range(5)] == [48, 84, 120,
                                                                                                   156, 192]
    assert [low.bounds(i) for i in range(4)] == [(0, 24), (24, 72), (72, 144), (144, 216)]
    assert [low.window(i, 160) for i in range(low.num_chunks(160))] == [(0, 24), (0, 96), (24, 160), (96, 160)]
    assert [low.window(i + 1, 400) for i in range(5)] == [ref.window(i, 400) for i in range(5)]
    assert not low.ready(0, 11, False) and low.ready(0, 12, False)          # 24 mel frames = 12 codes
    assert [low.codes_needed(i) for i in range(4)] == [12, 48, 84, 120]
    assert [low.num_chunks(f) for f in (2, 24, 26, 72, 74, 144, 146)] == [1, 1, 2, 2, 3, 3, 4]
    ahead = ChunkPlan.for_family(fam, Token2WavStreamConfig(first_chunk_frames=48, first_lookahead_frames=8))
    assert ahead.window(0, 400) == (0, 56) and ahead.codes_needed(0) == 28 and ahead.bounds(1) == (48, 72)
    odd = ChunkPlan.for_family(fam, Token2WavStreamConfig(first_chunk_frames=100))
    assert odd.bounds(1) == (100, 144)
    assert odd.window(1, 400) == (48, 168)            # starts on a DiT block (100 - 48 = 52 rounded down)


@pytest.mark.parametrize("first, ahead", [(20, 0), (8, 24), (25, 0), (24, 3)])
def test_a_plan_that_cannot_splice_is_refused(engine, first, ahead):
    with pytest.raises(ConfigError, match="first_chunk_frames|first_lookahead_frames"):
        ChunkPlan.for_family(engine.family, Token2WavStreamConfig(first_chunk_frames=first,
                                                                  first_lookahead_frames=ahead))


def test_a_small_first_chunk_against_the_reference_and_the_whole_utterance(engine):
    fam, params = engine.family, DiffusionParams(seed=0, num_inference_steps=3)
    codes, noise = random_codes(80, 0), stream_noise(engine.family, 7, 160)       # 160 frames
    low = synthesize_chunked(engine, codes, "Ethan", params, noise, plan=ChunkPlan.for_family(fam, LOW))
    ref = np.concatenate(synthesize_chunked(engine, codes, "Ethan", params, noise))
    whole = engine.generate(params=params, speech=SpeechInput(codes, "Ethan", noise=noise), use_tqdm=False)[0]
    assert [len(p) for p in low] == [4 * HOP, 48 * HOP, 72 * HOP, 36 * HOP]      # no gap, no repeat
    chunked = np.concatenate(low)
    assert chunked.shape == ref.shape == whole.shape
    # after the first chunk's influence (frame 52): the reference plan's samples
    assert np.abs(chunked[52 * HOP:] - ref[52 * HOP:]).max() < 3e-5
    head = slice(0, 52 * HOP)
    diff, rms = np.abs(chunked - whole), np.sqrt((whole ** 2).mean())
    rel_head = np.sqrt((diff[head] ** 2).mean()) / np.sqrt((whole[head] ** 2).mean())
    rel = np.sqrt((diff ** 2).mean()) / rms
    ref_rel = np.sqrt(((ref - whole) ** 2).mean()) / rms
    print(f"first chunk 24 frames, no look-ahead vs whole utterance: max |diff| {diff.max():.2e} (rms {rms:.3f}), "
          f"relative rms {rel:.2e} (first 52 frames {rel_head:.2e}); the reference plan: {ref_rel:.2e}")
    assert diff.max() < 4e-2 and rel_head < 3.5e-2 and rel < 2e-2, (diff.max(), rel_head, rel)


def test_the_stage_starts_the_audio_after_the_first_chunks_codes(engine):
    """Token2WavStageEngine with ``token2wav_stream``: the first piece leaves once 12 codes are fed (before
    any more), and the stream's pieces equal the offline synthesis with the same plan."""
    from omni_ray.dit import AsyncDiTEngine
    from omni_ray.stages.requests import SpeechRequest
    from omni_ray.stages.token2wav import Token2WavStageEngine

    codes = random_codes(40, 3)                                     # 80 frames: chunks [0, 24), [24, 72), [72, 80)
    config = engine.config.model_copy(update={"token2wav_stream": LOW})

    async def run():
        stage = Token2WavStageEngine(config, engine=AsyncDiTEngine(config, family=engine.family))
        stage.start()
        req = SpeechRequest("low-0", "Ethan", DiffusionParams(seed=4, num_inference_steps=2))
        out = stage.generate(req)
        try:
            await stage.feed(req.request_id, codes[:12].tolist(), False)
            first = await asyncio.wait_for(anext(out), 120)
            await stage.feed(req.request_id, codes[12:].tolist(), True)
            return stage.plan, [first] + [d async for d in out]
        finally:
            await out.aclose()
            await stage.engine.shutdown()

    plan, got = asyncio.run(run())
    assert plan == ChunkPlan.for_family(engine.family, LOW)
    assert [d["chunk"] for d in got] == [0, 1, 2] and [d["finished"] for d in got] == [False, False, True]
    assert all(d["times"]["ready"] <= d["times"]["mel"] for d in got)
    offline = synthesize_chunked(engine, codes, "Ethan", DiffusionParams(seed=0, num_inference_steps=2),
                                 stream_noise(engine.family, 4), plan=plan)
    assert [len(d["pcm"]) for d in got] == [len(p) for p in offline] == [4 * HOP, 48 * HOP, 28 * HOP]
    assert all(np.abs(d["pcm"] - p).max() < 3e-5 for d, p in zip(got, offline))


def test_held_windows_start_together_once_the_codes_are_in(engine):
    """``token2wav_hold_s``: with the audio already sent not yet played out (a frozen clock), a computable window
    after the first waits; when the last codes come, it starts with the next one (one batched engine step), and
    the pieces are those of the stage without holding."""
    from omni_ray.dit import AsyncDiTEngine
    from omni_ray.stages.requests import SpeechRequest
    from omni_ray.stages.token2wav import Token2WavStageEngine

    codes = random_codes(60, 3)                                     # 120 frames: [0, 24), [24, 72), [72, 120)

    async def run(hold):
        config = engine.config.model_copy(update={"token2wav_stream": LOW, "token2wav_hold_s": hold})
        stage = Token2WavStageEngine(config, engine=AsyncDiTEngine(config, family=engine.family))
        stage.start()
        stage.clock = lambda: 100.0                                 # the first piece never plays out
        req = SpeechRequest(f"hold-{hold}", "Ethan", DiffusionParams(seed=4, num_inference_steps=2))
        out = stage.generate(req)
        got: list = []

        async def collect():
            async for d in out:
                got.append(d)

        task = asyncio.create_task(collect())
        try:
            await stage.feed(req.request_id, codes[:12].tolist(), False)
            while not got:
                await asyncio.sleep(0.01)
            await stage.feed(req.request_id, codes[12:48].tolist(), False)     # chunk 1 computable (48 codes)
            await asyncio.sleep(0.5)
            started = stage.engine.stats()["requests_added"]
            await stage.feed(req.request_id, codes[48:].tolist(), True)
            await asyncio.wait_for(task, 120)
            return got, started, stage.engine.stats()
        finally:
            task.cancel()
            await stage.engine.shutdown()

    held, started, stats = asyncio.run(run(0.0))
    plain, started_plain, _ = asyncio.run(run(None))
    assert started == 1 and started_plain == 2                      # held: only chunk 0 was started before the end
    assert stats["max_batch_size"] >= 2                             # chunks 1 and 2 in one engine step
    assert [d["chunk"] for d in held] == [0, 1, 2] and [d["finished"] for d in held] == [False, False, True]
    assert all(np.abs(a["pcm"] - b["pcm"]).max() < 3e-5 for a, b in zip(held, plain))


def test_a_stream_hands_out_the_first_window_early(engine):
    stream = SpeechStream(engine.family, "Ethan", noise=stream_noise(engine.family, 1, 200),
                          plan=ChunkPlan.for_family(engine.family, LOW))
    assert stream.push(random_codes(11, 5)) == []
    first = stream.push(random_codes(1, 6))
    assert [(w.index, w.start, w.last, len(w.speech.codes)) for w in first] == [(0, 0, False, 12)]
    assert stream.push(random_codes(35, 7)) == []                       # 47 codes: chunk 1 needs 48
    assert [w.index for w in stream.push(random_codes(1, 8))] == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_first_chunk_on_cuda_graphs(token2wav_ckpt):
    """The low-latency plan's windows (a 24-frame first window among longer ones) replayed as CUDA graphs
    equal the eager forward's (waveforms: the vocoder amplifies mel differences, as in
    test_omni_token2wav_graphs.py)."""
    from omni_ray.config import DiTEngineConfig, ModelConfig
    from omni_ray.dit import DiTEngine

    engines = [DiTEngine(DiTEngineConfig(model=ModelConfig(path=str(token2wav_ckpt)), device="cuda", cuda_graphs=g))
               for g in (True, False)]
    plan = ChunkPlan.for_family(engines[0].family, LOW)
    codes, noise = random_codes(150, 9), stream_noise(engines[0].family, 7, 300)
    params = DiffusionParams(seed=0, num_inference_steps=3)
    graphed, eager = (synthesize_chunked(e, codes, "Ethan", params, noise, plan=plan) for e in engines)
    assert engines[0].engine_stats()["ode_graph_replays"] > 0             # whole ODEs (token2wav_ode.py)
    assert [len(p) // HOP for p in graphed] == [len(p) // HOP for p in eager] == [4, 48, 72, 72, 72, 32]
    # bound as measured on an H100 (test_omni_token2wav_graphs: the vocoder amplifies mel rounding)
    assert all(np.abs(p - q).max() < 5e-3 for p, q in zip(graphed, eager))
