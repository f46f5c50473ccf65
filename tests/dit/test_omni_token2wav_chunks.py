"""Chunked token2wav (Qwen's streaming code2wav windows) against the whole-utterance synthesis.

The windows are not exact (the ODE's repeated block attention reaches past a window's context), so
the concatenated chunks differ from the whole utterance. Measured on this tiny checkpoint
(2 layers, look-back and look-ahead of one block, spread weights, 3 time points): max |diff|
~9e-4 on a waveform of rms ~0.14 (relative rms ~3e-4); an utterance of one chunk is exact. The bounds
below leave ~2x room; a splice off by one frame gives differences of the signal's own size.
"""

import numpy as np
import pytest
import torch

from omni_ray.dit import DiffusionParams, SpeechInput
from omni_ray.dit.token2wav_chunks import ChunkPlan, stream_noise, synthesize_chunked
from tests.dit.conftest import make_engine


@pytest.fixture(scope="module")
def engine(token2wav_ckpt):
    return make_engine(str(token2wav_ckpt))


def test_plan_is_the_references(engine):
    plan = ChunkPlan.for_family(engine.family)
    assert (plan.chunk, plan.past, plan.future, plan.overlap, plan.hop) == (72, 48, 24, 20, 240)
    assert [plan.window(i, 160) for i in range(plan.num_chunks(160))] == [(0, 96), (24, 160), (96, 160)]
    assert not plan.ready(0, 47, False) and plan.ready(0, 48, False)      # 96 mel frames = 48 codes
    assert plan.ready(2, 50, True)


@pytest.mark.parametrize("mel_dim, limit", [(80, 32768), (8, 1000), (3, 777)])
def test_lazy_noise_equals_one_draw_of_it_all(mel_dim, limit):
    """The stream's noise drawn as frames are needed equals ``stream_noise``'s one draw (the 7B's shape, and odd
    ones whose blocks of 16 values do not align with frames), up to the position limit."""
    from types import SimpleNamespace

    from omni_ray.dit.token2wav_chunks import LazyNoise

    fam = SimpleNamespace(max_sequence_length=limit, mel_dim=mel_dim)
    whole = stream_noise(fam, 11)
    lazy = LazyNoise(fam, 11)
    for frames in (1, 24, 96, 300, 301, 700, limit - 5, limit):
        got = lazy.upto(min(frames, limit))
        assert got.shape[0] >= min(frames, limit) and torch.equal(got, whole[:got.shape[0]]), frames
    assert lazy.drawn.shape[0] == limit


def test_chunks_concatenate_to_the_whole_utterance(engine):
    params = DiffusionParams(seed=0, num_inference_steps=3)
    codes = torch.randint(0, 64, (80,), generator=torch.Generator().manual_seed(0))    # 160 frames: 3 chunks
    noise = stream_noise(engine.family, 7, 160)
    forwards = engine.engine_stats()["steps"]
    pieces = synthesize_chunked(engine, codes, "Ethan", params, noise)
    assert engine.engine_stats()["steps"] - forwards == 8                 # the three windows share each forward
    whole = engine.generate(params=params, speech=SpeechInput(codes, "Ethan", noise=noise), use_tqdm=False)[0]
    chunked = np.concatenate(pieces)
    assert [len(p) for p in pieces] == [52 * 240, 72 * 240, 36 * 240]
    assert chunked.shape == whole.shape
    diff = np.abs(chunked - whole)
    rms = np.sqrt((whole ** 2).mean())
    assert diff.max() < 2e-3 and np.sqrt((diff ** 2).mean()) / rms < 1e-3, (diff.max(), rms)

    one = codes[:30]                                                      # one chunk: the whole window
    piece = synthesize_chunked(engine, one, "Ethan", params, noise)
    alone = engine.generate(params=params, speech=SpeechInput(one, "Ethan", noise=noise[:60]), use_tqdm=False)[0]
    assert len(piece) == 1 and np.abs(piece[0] - alone).max() < 3e-5      # the same request


def test_streamed_codes_give_the_whole_utterances_windows(engine):
    """Codes arriving 7 at a time: each window is handed out as soon as its right context exists, and
    the windows equal those of the whole utterance (so the audio does too)."""
    from omni_ray.dit.token2wav_chunks import SpeechStream

    codes = torch.randint(0, 64, (130,), generator=torch.Generator().manual_seed(1))
    noise = stream_noise(engine.family, 3, 260)
    whole = SpeechStream(engine.family, "Ethan", noise=noise).push(codes, finished=True)
    stream, got, seen_at = SpeechStream(engine.family, "Ethan", noise=noise), [], []
    for a in range(0, 130, 7):
        new = stream.push(codes[a:a + 7], finished=a + 7 >= 130)
        got += new
        seen_at += [min(a + 7, 130)] * len(new)
    assert [(w.index, w.start, w.last) for w in got] == [(w.index, w.start, w.last) for w in whole]
    assert [w.last for w in got] == [False, False, False, True]
    assert seen_at[:3] == [49, 84, 126]                 # chunk i needs 36 (i + 1) + 12 codes: 48, 84, 120
    for w, x in zip(got, whole):
        assert torch.equal(w.speech.codes, x.speech.codes) and torch.equal(w.speech.noise, x.speech.noise)
    with pytest.raises(ValueError):
        stream.push([1])


def test_a_stream_on_the_async_engine(engine):
    """The stage's loop: windows as speech requests returning mels, the vocoder between engine steps."""
    import asyncio

    from omni_ray.dit import AsyncDiTEngine
    from omni_ray.dit.token2wav_chunks import SpeechStream

    codes = torch.randint(0, 64, (60,), generator=torch.Generator().manual_seed(2))    # 120 frames: 2 chunks
    params = DiffusionParams(seed=0, num_inference_steps=2)

    async def run():
        eng = AsyncDiTEngine(engine.config, family=engine.family)        # the same loaded model
        stream, pieces = SpeechStream(engine.family, "Chelsie", seed=9), []
        try:
            for a in (0, 50):
                for w in stream.push(codes[a:a + 50], finished=a == 50):
                    async for ev in eng.generate(None, params, f"s-{w.index}", speech=w.speech, output_type="latent"):
                        pass
                    pieces.append(await eng.run_between_steps(stream.audio, w, ev.images[0]))
        finally:
            await eng.shutdown()
        return stream, pieces

    stream, pieces = asyncio.run(run())
    offline = synthesize_chunked(engine, codes, "Chelsie", params, stream.noise)
    assert [len(p) for p in pieces] == [len(p) for p in offline] == [52 * 240, 68 * 240]
    assert all(np.abs(p - q).max() < 3e-5 for p, q in zip(pieces, offline))


def test_the_stage_vocodes_streams_windows_together(engine):
    """Three streams fed at once through Token2WavStageEngine: windows that finish in the same engine step
    are vocoded in one batch per mel length (fewer vocoder calls than windows), and each stream's pieces
    equal its offline chunked synthesis."""
    import asyncio

    from omni_ray.dit import AsyncDiTEngine
    from omni_ray.stages.requests import SpeechRequest
    from omni_ray.stages.token2wav import Token2WavStageEngine

    codes = [torch.randint(0, 64, (60,), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    params = DiffusionParams(seed=0, num_inference_steps=2)

    async def one(stage, i):
        req = SpeechRequest(f"v-{i}", "Ethan", DiffusionParams(seed=20 + i, num_inference_steps=2))
        await stage.feed(req.request_id, codes[i].tolist(), True)
        return [d["pcm"] async for d in stage.generate(req)]

    async def run():
        stage = Token2WavStageEngine(engine.config, engine=AsyncDiTEngine(engine.config, family=engine.family))
        stage.start()
        try:
            return await asyncio.gather(*(one(stage, i) for i in range(3))), stage._vocoder
        finally:
            await stage.engine.shutdown()

    streams, vocoder = asyncio.run(run())
    assert vocoder.mels == 6 and vocoder.calls < 6, (vocoder.calls, vocoder.mels)    # 3 streams x 2 windows
    for i, pieces in enumerate(streams):
        offline = synthesize_chunked(engine, codes[i], "Ethan", params, stream_noise(engine.family, 20 + i))
        assert [len(p) for p in pieces] == [len(p) for p in offline] == [52 * 240, 68 * 240]
        assert all(np.abs(p - q).max() < 3e-5 for p, q in zip(pieces, offline))
