"""token2wav's whole-forward graphs (omni_ray/dit/token2wav_graphs.py).

CPU: the padded path (rows to a row bucket, frames to a frame bucket) run eagerly equals the unpadded
forward within 1e-5 (fp32), for whole utterances, stream windows and several requests in one forward.
GPU (run by the lead): graph replays equal eager forwards on CUDA within 1e-4 (fp32), the replay
counter proves the graphs ran; bf16 autocast against fp32 within the stated tolerance.
"""

import pytest
import torch

from omni_ray.config import DiTEngineConfig, ModelConfig
from omni_ray.dit import DiffusionParams, DiTEngine, SpeechInput
from omni_ray.dit.token2wav_chunks import stream_noise, synthesize_chunked
from omni_ray.dit.token2wav_graphs import Token2WavGraphs, frame_bucket
from tests.dit.conftest import make_engine
from tests.dit.omni_token2wav_utils import random_codes

STEPS = 3
TOL = 1e-5


@pytest.fixture(scope="module")
def engine(token2wav_ckpt):
    return make_engine(str(token2wav_ckpt))


def _mels(engine, speech, seeds):
    params = [DiffusionParams(seed=s, num_inference_steps=STEPS) for s in seeds]
    return engine.generate(params=params, speech=speech, output_type="latent", use_tqdm=False)


def test_frame_buckets():
    assert [frame_bucket(n, 24) for n in (1, 48, 49, 96, 144, 384, 385, 400)] == [48, 48, 96, 96, 144, 384, 576, 576]


def test_padded_forwards_equal_unpadded(engine):
    """Three requests (10, 23 and 37 codes: 20, 46 and 74 frames) padded to 4 x 96 frames (CFG: 6 rows
    -> the 8-row bucket, 74 frames -> 96), against the same requests unpadded, alone and together."""
    speech = [SpeechInput(random_codes(n, n), v) for n, v in ((10, "Ethan"), (23, "Chelsie"), (37, "Ethan"))]
    seeds = [1, 2, 3]
    plain = _mels(engine, speech, seeds)
    alone = [_mels(engine, [s], [seed])[0] for s, seed in zip(speech, seeds)]
    runner = engine.runner
    saved = runner.graphs
    runner.graphs = padded = Token2WavGraphs(engine.family, max_rows=32, capture=False, pad=True)
    try:
        padded_mels = _mels(engine, speech, seeds)
    finally:
        runner.graphs = saved
    assert padded.padded_eager == 4 * (STEPS - 1) and set(padded.ios) == {(8, 96)}
    for p, q, a in zip(padded_mels, plain, alone):
        assert p.shape == q.shape
        assert (p - q).abs().max() < TOL and (p - a).abs().max() < TOL
        assert p.abs().max() > 0.1                          # a mel, not zeros


def test_padded_stream_windows_equal_unpadded(engine):
    """A streamed utterance's windows (96 and 76 frames: 2 rows each with CFG) padded to 96 frames."""
    codes = random_codes(50, 4)
    params = DiffusionParams(seed=0, num_inference_steps=STEPS)
    noise = stream_noise(engine.family, 7, 100)
    plain = synthesize_chunked(engine, codes, "Ethan", params, noise)
    runner = engine.runner
    saved = runner.graphs
    runner.graphs = padded = Token2WavGraphs(engine.family, max_rows=32, capture=False, pad=True)
    try:
        pieces = synthesize_chunked(engine, codes, "Ethan", params, noise)
    finally:
        runner.graphs = saved
    assert padded.padded_eager > 0 and set(padded.ios) == {(4, 96)}
    assert len(pieces) == len(plain) == 2
    for p, q in zip(pieces, plain):
        assert abs(p - q).max() < 3e-5                      # waveforms: the vocoder amplifies mel rounding


def test_a_failed_capture_falls_back_to_the_padded_eager_forward(engine):
    """Capture on the CPU fails (no CUDA): logged once per shape, then that shape runs padded and eagerly."""
    speech = [SpeechInput(random_codes(10, 1), "Ethan")]
    plain = _mels(engine, speech, [3])[0]
    runner = engine.runner
    saved = runner.graphs
    runner.graphs = g = Token2WavGraphs(engine.family, max_rows=32, capture=True)
    try:
        mel = _mels(engine, speech, [3])[0]
    finally:
        runner.graphs = saved
    assert g.failed == {(2, 48)} and not g.graphs and g.replays == 0 and g.padded_eager == 4 * (STEPS - 1)
    assert (mel - plain).abs().max() < TOL


def test_bf16_precision_near_fp32(engine):
    """token2wav_precision bf16 (autocast) on the CPU: the mel stays float32 and within relative rms 1e-2
    of fp32 (measured ~3.3e-3 on this checkpoint, 2 layers x 8 forwards)."""
    speech = [SpeechInput(random_codes(n, n), "Ethan") for n in (10, 23)]
    fp32 = _mels(engine, speech, [1, 2])
    runner = engine.runner
    saved = runner.graphs
    runner.graphs = Token2WavGraphs(engine.family, max_rows=32, capture=False, precision="bf16")
    try:
        bf16 = _mels(engine, speech, [1, 2])
    finally:
        runner.graphs = saved
    for a, b in zip(bf16, fp32):
        assert a.dtype == torch.float32
        rel = float(((a - b).pow(2).mean() / b.pow(2).mean()).sqrt())
        assert 1e-5 < rel < 1e-2, rel                       # bf16 did run (not fp32) and stays close


def test_bf16_runs_on_bf16_linears_equal_to_autocasting_the_loaded_ones(engine):
    """precision bf16's forward runs on a copy of the transformer with bf16 linears (``bf16_linears``: autocast's
    per-call weight casts made once): the same as autocasting the loaded float32 module, to the bit; the loaded
    family keeps its float32 weights (fp32 engines may share it)."""
    from omni_ray.dit.token2wav_graphs import bf16_linears

    fam = engine.family
    g = Token2WavGraphs(fam, max_rows=32, capture=False, precision="bf16", fused=False)     # layer by layer
    lin = [m for m in g.forward_family.transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert lin and all(m.weight.dtype == torch.bfloat16 for m in lin)
    assert all(p.dtype == torch.float32 for p in fam.transformer.parameters())
    assert g.forward_family.transformer is not fam.transformer
    assert bf16_linears(fam).block_fns[0] is not fam.block_fns[0]
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 48, fam.mel_dim), torch.randn(2, 48, fam.caption_dim)
    t, lengths = torch.tensor([0.3, 0.7]), torch.tensor([48, 30])
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), torch.no_grad():
        ref = fam.forward(x, t, ctx, lengths, None).float()
    assert torch.equal(g._forward(x, t, ctx, lengths), ref)


# ----------------------------------------------------------------------------------------------- GPU
def _cuda_engine(ckpt, **kw) -> DiTEngine:
    """One RK4 evaluation per engine step, so the per-forward graphs run (whole ODEs: test_omni_token2wav_ode.py)."""
    return DiTEngine(DiTEngineConfig(model=ModelConfig(path=str(ckpt)), device="cuda", token2wav_whole_ode=False,
                                     **kw))


def _gpu_cases():
    cases = ((10, "Ethan"), (23, "Chelsie"), (37, "Ethan"), (72, "Ethan"))
    speech = [SpeechInput(random_codes(n, n), v) for n, v in cases]
    return speech, [1, 2, 3, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_equal_eager(token2wav_ckpt):
    """Whole utterances (4 requests batched, and one alone) and stream windows: graphs vs eager on CUDA."""
    graphed, eager = _cuda_engine(token2wav_ckpt), _cuda_engine(token2wav_ckpt, cuda_graphs=False)
    speech, seeds = _gpu_cases()
    for n in (len(speech), 1):
        g = _mels(graphed, speech[:n], seeds[:n])
        e = _mels(eager, speech[:n], seeds[:n])
        for a, b in zip(g, e):
            assert (a - b).abs().max() < 1e-4
    stats = graphed.engine_stats()
    assert stats["cuda_graphs"] >= 2 and stats["cuda_graph_replays"] >= 2 * 4 * (STEPS - 1)
    assert eager.engine_stats()["cuda_graph_replays"] == 0

    codes = random_codes(150, 9)
    params = DiffusionParams(seed=0, num_inference_steps=STEPS)
    noise = stream_noise(graphed.family, 7, 300)
    before = graphed.engine_stats()["cuda_graph_replays"]
    pieces = synthesize_chunked(graphed, codes, "Ethan", params, noise)
    assert graphed.engine_stats()["cuda_graph_replays"] > before
    for p, q in zip(pieces, synthesize_chunked(eager, codes, "Ethan", params, noise)):
        # waveforms: the vocoder amplifies mel rounding (its cuDNN convolutions run TF32, torch's default for
        # convolutions); measured 2.3e-3 at most on an H100 (samples in [-1, 1]), the mels within 1e-4
        assert abs(p - q).max() < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_lower_precision_mels_near_fp32(token2wav_ckpt, precision):
    """token2wav_precision bf16 / tf32 (graphed) against fp32: relative rms of the mel difference below 1e-2
    (bf16: ~3.3e-3 measured on the CPU, 8 bits of mantissa over 2 layers x 8 forwards; TF32 keeps 11)."""
    low, fp32 = _cuda_engine(token2wav_ckpt, token2wav_precision=precision), _cuda_engine(token2wav_ckpt)
    speech, seeds = _gpu_cases()
    for a, b in zip(_mels(low, speech, seeds), _mels(fp32, speech, seeds)):
        assert a.dtype == torch.float32
        rel = ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt()
        assert rel < 1e-2, rel
    assert low.engine_stats()["cuda_graph_replays"] > 0
    assert not torch.backends.cuda.matmul.allow_tf32          # the switch is restored after each forward
