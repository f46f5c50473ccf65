"""token2wav's vocoder as CUDA graphs (omni_ray/dit/vocoder_graphs.py).

CPU: the graph body equals transformers' forward exactly; the engine's decode (whole utterances and the
VocoderBatcher) runs eagerly through it as before; the shape rules (second sighting, row buckets, exact lengths,
the LRU bound, warm-up of the chunk plan's lengths) on the padded static-buffer path, its "graph" replaying the
body on the CPU; a failed capture runs eagerly.
GPU (run by the lead): replays equal eager within 1e-5 (fp32 with cuDNN's TF32 off), a padded batch's rows equal
the rows alone, the engine's graphs and stats, the stage's warm-up, and bf16's error against fp32 (printed).
"""

import logging
from types import SimpleNamespace

import pytest
import torch

from omni_ray.dit import DiffusionParams, SpeechInput
from omni_ray.dit.token2wav_chunks import ChunkPlan, SpeechStream, stream_noise, synthesize_chunked
from omni_ray.dit.vocoder_batch import VocoderBatcher
from omni_ray.dit.vocoder_graphs import MAX_GRAPH_FRAMES, ShapeBudget, VocoderGraphs, vocode
from tests.dit.conftest import make_engine
from tests.dit.omni_token2wav_utils import random_codes

STEPS = 2


@pytest.fixture(scope="module")
def engine(token2wav_ckpt):
    return make_engine(str(token2wav_ckpt))


def _mels(rows: int, frames: int, seed: int) -> torch.Tensor:
    """Mels [rows, frames, 80] in a log-amplitude range that reaches below the vocoder's -115 dB floor."""
    return torch.randn(rows, frames, 80, generator=torch.Generator().manual_seed(seed)) * 4 - 6


def _alone(fam, mels: torch.Tensor) -> torch.Tensor:
    """transformers' forward on each mel alone -> [rows, samples]."""
    return torch.stack([fam.vae(m.T[None].to(fam.device)).reshape(-1).cpu() for m in mels])


class _Replay:
    """A recorded "graph" on the CPU: replay runs the body on the static input into the static output."""

    def __init__(self, run, mel, out):
        self.run, self.mel, self.out = run, mel, out

    def replay(self):
        self.out.copy_(self.run(self.mel))


class CPUGraphs(VocoderGraphs):
    """VocoderGraphs whose recording replays the body eagerly: the shape rules and static buffers on the CPU."""

    def _record(self, mel):
        out = self._vocode(mel)
        return _Replay(self._vocode, mel, out), out


class FailingGraphs(VocoderGraphs):
    def _record(self, mel):
        raise RuntimeError("capture failed")


def test_vocode_equals_transformers_forward(engine):
    fam = engine.family
    for rows, frames in ((1, 37), (3, 20)):
        mel = _mels(rows, frames, frames).permute(0, 2, 1)
        out = vocode(fam.vae, mel, fam.vocoder_graphs._min_level)
        assert torch.equal(out, fam.vae(mel).reshape(rows, -1))
        assert out.shape == (rows, frames * 240) and out.abs().max() > 0.1


def test_cpu_engine_vocodes_eagerly_as_before(engine):
    """The engine's decode paths (whole utterances: ``audio_outputs``; streams: ``VocoderBatcher``) go through
    its VocoderGraphs, eagerly on the CPU, and give transformers' forward's waveforms."""
    fam, voc = engine.family, engine.family.vocoder_graphs
    assert isinstance(voc, VocoderGraphs) and not voc.capture
    speech = [SpeechInput(random_codes(n, n), "Ethan") for n in (10, 10, 13)]
    params = [DiffusionParams(seed=s, num_inference_steps=STEPS) for s in (1, 2, 3)]
    mels = engine.generate(params=params, speech=speech, output_type="latent", use_tqdm=False)
    runs = voc.eager_runs
    waves = engine.generate(params=params, speech=speech, use_tqdm=False)
    assert voc.eager_runs == runs + 2                       # one batch per mel length (20 and 26 frames)
    pair = fam.vae(torch.stack(mels[:2]).permute(0, 2, 1))              # today's decode: the batch of equal lengths
    for w, ref in zip(waves, [*pair, fam.vae(mels[2].T[None])]):
        assert torch.equal(torch.from_numpy(w), ref.reshape(-1))
    batched = VocoderBatcher(SimpleNamespace(engine=engine), max_batch=8)._decode_all(mels)
    assert voc.eager_runs == runs + 4
    for b, w in zip(batched, waves):
        assert torch.equal(b, torch.from_numpy(w))
    stats = engine.engine_stats()
    assert stats["vocoder_graphs"] == 0 and stats["vocoder_graph_replays"] == 0


def test_shape_budget():
    b = ShapeBudget(max_graphs=2)
    assert not b.sight((1, 112), held=False) and b.sight((1, 112), held=False)     # captured on the second
    assert not b.sight((1, 112), held=True)                                         # held: replayed
    assert not b.sight((2, 112), held=False) and not b.sight((1, 72), held=False)   # other shapes count apart
    for n in range(b.max_seen + 1):                                                 # sightings are bounded
        b.sight((1, 1000 + n), held=False)
    assert len(b.seen) == b.max_seen and (2, 112) not in b.seen
    zero = ShapeBudget(max_graphs=0)
    assert not zero.sight((1, 1), held=False) and not zero.sight((1, 1), held=False)


def test_padded_rows_exact_lengths_and_lru(engine):
    """Static buffers per (row bucket, exact length): rows padded with zeros equal the rows alone; the second
    sighting captures; the least recently used graph is dropped past the bound; long mels and too many rows
    run eagerly; a result is a copy (the next replay does not change it); the engine's stats count them."""
    fam = engine.family
    voc = CPUGraphs(fam, max_rows=8, capture=True, max_graphs=2)
    saved, fam.vocoder_graphs = fam.vocoder_graphs, voc
    try:
        a, b = _mels(3, 8, 1), _mels(3, 8, 2)
        first = fam.decode(a)                                # seen once: eager
        assert voc.eager_runs == 1 and not voc.graphs
        second = fam.decode(a)                               # seen twice: captured (4-row bucket) and replayed
        assert list(voc.graphs) == [(4, 8)] and voc.replays == 1 and voc.captures == 1
        alone = _alone(fam, a)
        assert (second - alone).abs().max() < 1e-5 and (first - alone).abs().max() < 1e-5
        other = fam.decode(b)
        assert voc.replays == 2 and (other - _alone(fam, b)).abs().max() < 1e-5
        assert torch.equal(second, fam.decode(a))            # unchanged by the replay of b
        assert voc.graphs[(4, 8)].mel[3].abs().max() == 0    # the padded row: zeros

        c = _mels(1, 9, 3)                                  # one frame longer: a shape of its own (never padded)
        fam.decode(c)
        assert (fam.decode(c) - _alone(fam, c)).abs().max() < 1e-5
        assert list(voc.graphs) == [(4, 8), (1, 9)]
        fam.decode(a)                                        # (4, 8) most recently used
        d = _mels(5, 8, 4)                                   # 8-row bucket: captured, drops (1, 9)
        fam.decode(d)
        fam.decode(d)
        assert list(voc.graphs) == [(4, 8), (8, 8)] and voc.captures == 3
        stats = engine.engine_stats()
        assert stats["vocoder_graphs"] == 2 and stats["vocoder_graph_replays"] == voc.replays == 6

        assert voc.key(9, 4) is None and voc.key(1, MAX_GRAPH_FRAMES + 1) is None   # past the bucket / length bound
        assert voc.key(8, MAX_GRAPH_FRAMES) == (8, MAX_GRAPH_FRAMES)
        eager, m = voc.eager_runs, _mels(9, 4, 5)
        assert (fam.decode(m) - fam.decode(m)).abs().max() == 0
        assert voc.eager_runs == eager + 2 and voc.captures == 3
    finally:
        fam.vocoder_graphs = saved


def test_warmup_captures_the_plans_lengths(engine):
    """The stage's warm-up captures the plan's recurring vocoder lengths for one row, which are the lengths a
    long stream's non-last chunks are vocoded at (the last chunk's varies)."""
    fam = engine.family
    plan = ChunkPlan.for_family(fam)
    small = ChunkPlan(**{**plan.__dict__, "first": 24, "first_future": 0})
    assert plan.vocoder_lengths() == [72, 112] and small.vocoder_lengths() == [24, 72, 112]
    for p in (plan, small):
        stream = SpeechStream(fam, "Ethan", plan=p)
        windows = stream.push(random_codes(200, 0), finished=True)
        lengths = [stream.vocoder_input(w, torch.zeros(w.speech.noise.shape)).shape[0] for w in windows]
        assert set(lengths[:-1]) == set(p.vocoder_lengths()) and len(windows) > 4
        last = set()
        for n in range(1, 200):                                  # utterances of every length: their last chunk's
            stream = SpeechStream(fam, "Ethan", plan=p)
            mels = [stream.vocoder_input(w, torch.zeros(w.speech.noise.shape))
                    for w in stream.push(random_codes(n, n), finished=True)]
            last.add(mels[-1].shape[0])
        assert last == set(p.last_vocoder_lengths()) == set(range(2, 113, 2))
    voc = CPUGraphs(fam, max_rows=8, capture=True)
    assert voc.warmup(small.vocoder_lengths()) == 3 and set(voc.graphs) == {(1, 24), (1, 72), (1, 112)}
    capped = CPUGraphs(fam, max_rows=8, capture=True, max_graphs=4)       # within max_graphs, in the given order
    assert capped.warmup([112, 72, 112, 24, 30, 40]) == 4 and list(capped.graphs) == [(1, n) for n in (112, 72, 24, 30)]
    mel = _mels(1, 112, 7)
    assert (voc.decode(mel) - _alone(fam, mel)).abs().max() < 1e-5 and voc.replays == 1 and voc.eager_runs == 0
    assert VocoderGraphs(fam, max_rows=8, capture=False).warmup([24]) == 0          # the CPU engine's: eager
    off = CPUGraphs(fam, max_rows=8, capture=True, max_graphs=0)                    # token2wav_vocoder_graphs: 0
    assert off.warmup([24]) == 0 and off.key(1, 24) is None


def test_a_failed_capture_runs_eagerly(engine, caplog):
    fam = engine.family
    voc = FailingGraphs(fam, max_rows=8, capture=True)
    mel = _mels(2, 6, 8)
    with caplog.at_level(logging.WARNING, logger="omni_ray.dit.vocoder_graphs"):
        outs = [voc.decode(mel) for _ in range(3)]
    assert voc.failed == {(2, 6)} and not voc.graphs and voc.replays == 0 and voc.eager_runs == 3
    assert len([r for r in caplog.records if "capture failed" in r.getMessage()]) == 1     # tried once
    for o in outs:
        assert torch.equal(o, fam.vae(mel.permute(0, 2, 1)).reshape(2, -1))


def test_bf16_vocoder_runs_in_bf16(engine):
    """``token2wav_vocoder_precision: bf16`` on the CPU: float32 samples, measurably not fp32's (relative rms
    ~6e-2 on this checkpoint's spread weights: why fp32 stays the default)."""
    fam = engine.family
    mel = _mels(1, 12, 9)
    fp32 = _alone(fam, mel)
    bf16 = VocoderGraphs(fam, max_rows=8, capture=False, precision="bf16").decode(mel)
    rel = float(((bf16 - fp32).pow(2).mean() / fp32.pow(2).mean()).sqrt())
    assert bf16.dtype == torch.float32 and 1e-3 < rel < 0.15, rel


# ----------------------------------------------------------------------------------------------- GPU
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def strict_fp32():
    """cuDNN convolutions in true float32 (torch's default lets them run TF32) for the 1e-5 comparisons."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = prev


def _cuda_engine(ckpt, **kw):
    from omni_ray.config import DiTEngineConfig, ModelConfig
    from omni_ray.dit import DiTEngine
    return DiTEngine(DiTEngineConfig(model=ModelConfig(path=str(ckpt)), device="cuda", **kw))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_replay_equals_eager(token2wav_ckpt, strict_fp32):
    """Replays against the eager body at the same padded shape: within 1e-5 (fp32, samples in [-1, 1]); each row
    of a padded batch against the row alone (other cuDNN algorithms per batch size): within 1e-4."""
    fam = _cuda_engine(token2wav_ckpt).family
    voc = VocoderGraphs(fam, max_rows=8, capture=True, max_graphs=16)
    for rows, frames in ((1, 24), (1, 112), (3, 72), (5, 57), (8, 112)):
        mel = _mels(rows, frames, rows * frames)
        eager = voc.decode(mel)                                      # first sighting: transformers' forward
        graphed = voc.decode(mel)                                    # captured and replayed
        key = voc.key(rows, frames)
        assert key in voc.graphs and graphed.shape == (rows, frames * 240)
        padded = torch.zeros(key[0], 80, frames, device="cuda")
        padded[:rows] = mel.permute(0, 2, 1).cuda()
        same_shape = vocode(fam.vae, padded, voc._min_level)[:rows].cpu()
        d_same = float((graphed - same_shape).abs().max())
        d_alone = float((graphed - _alone(fam, mel)).abs().max())
        print(f"rows {rows} frames {frames}: replay vs eager (same shape) {d_same:.2e}, vs rows alone {d_alone:.2e}")
        assert d_same < 1e-5 and d_alone < 1e-4 and float((eager - _alone(fam, mel)).abs().max()) < 1e-4
        assert graphed.abs().max() > 0.1
    assert voc.replays == 5 and voc.captures == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_streams_replay_vocoder_graphs(token2wav_ckpt):
    """A graphed engine (torch's default flags: TF32 convolutions) streams the same waveform as an eager one
    within 5e-3 (as test_omni_token2wav_graphs.py measures for the DiT graphs), its middle chunks (112 frames)
    replaying a vocoder graph; the stage's warm-up captures the plan's lengths."""
    from omni_ray.config import DiTEngineConfig, ModelConfig
    from omni_ray.dit.async_engine import AsyncDiTEngine
    from omni_ray.stages.token2wav import Token2WavStageEngine

    graphed, eager = _cuda_engine(token2wav_ckpt), _cuda_engine(token2wav_ckpt, cuda_graphs=False)
    codes = random_codes(200, 9)
    params = DiffusionParams(seed=0, num_inference_steps=STEPS)
    noise = stream_noise(graphed.family, 7, 400)
    pieces = synthesize_chunked(graphed, codes, "Ethan", params, noise)
    stats = graphed.engine_stats()
    assert stats["vocoder_graphs"] >= 1 and stats["vocoder_graph_replays"] >= 1
    assert eager.engine_stats()["vocoder_graphs"] == 0
    for p, q in zip(pieces, synthesize_chunked(eager, codes, "Ethan", params, noise)):
        assert abs(p - q).max() < 5e-3

    cfg = DiTEngineConfig(model=ModelConfig(path=str(token2wav_ckpt)), device="cuda")
    stage = Token2WavStageEngine(cfg, engine=AsyncDiTEngine(cfg))
    stage.start()
    voc = stage.family.vocoder_graphs
    assert set(voc.graphs) == {(1, n) for n in stage.plan.vocoder_lengths() + stage.plan.last_vocoder_lengths()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_vocoder_error(token2wav_ckpt):
    """bf16 (graphed) against fp32 (graphed): the relative rms of the waveform difference, printed for the docs
    (CPU: ~6e-2 on this checkpoint); bounded loosely: fp32 stays the default."""
    fam = _cuda_engine(token2wav_ckpt).family
    fp32 = VocoderGraphs(fam, max_rows=8, capture=True)
    bf16 = VocoderGraphs(fam, max_rows=8, capture=True, precision="bf16")
    for rows, frames in ((1, 112), (4, 72)):
        mel = _mels(rows, frames, frames)
        a, b = [[v.decode(mel) for _ in range(2)][-1] for v in (bf16, fp32)]
        rel = float(((a - b).pow(2).mean() / b.pow(2).mean()).sqrt())
        print(f"bf16 vocoder, rows {rows} frames {frames}: relative rms {rel:.2e}, max |diff| "
              f"{float((a - b).abs().max()):.2e}")
        assert a.dtype == torch.float32 and rel < 0.15
    assert bf16.replays == 2 and fp32.replays == 2
