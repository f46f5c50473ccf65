"""token2wav's whole ODE in one engine step (omni_ray/dit/token2wav_ode.py).

CPU: the whole-ODE function (run eagerly, unpadded and padded to the graphs' buckets) equals the step-by-step
path (``token2wav_whole_ode: false``) within 1e-5 on the mel (fp32): several requests of different lengths
together with CFG, stream windows of the reference plan and of the low-latency first chunk, groups of different
(num_steps, guidance) in one engine step, inputs past the graphs' limit beside them on the step path; a batch
finishes in one engine step; a failed capture falls back.
GPU (run by the lead): the captured whole ODE equals the eager one within 1e-4, the replay counter moved; bf16 /
tf32 within the stated tolerance of fp32.
"""

import logging

import pytest
import torch

from omni_ray.config import DiTEngineConfig, ModelConfig, Token2WavStreamConfig
from omni_ray.dit import DiffusionParams, DiTEngine, SpeechInput
from omni_ray.dit.token2wav_chunks import ChunkPlan, SpeechStream, stream_noise
from omni_ray.dit.token2wav_graphs import Token2WavGraphs
from omni_ray.dit.token2wav_ode import ODEShape, Token2WavODE
from tests.dit.conftest import make_engine
from tests.dit.omni_token2wav_utils import random_codes

STEPS = 3
TOL = 1e-5
LOW = Token2WavStreamConfig(first_chunk_frames=24, first_lookahead_frames=0)


@pytest.fixture(scope="module")
def whole(token2wav_ckpt):
    return make_engine(str(token2wav_ckpt))


@pytest.fixture(scope="module")
def stepwise(token2wav_ckpt):
    return make_engine(str(token2wav_ckpt), token2wav_whole_ode=False)


def _mels(engine, speech, params):
    return engine.generate(params=params, speech=speech, output_type="latent", use_tqdm=False)


def _padded(engine, capture=False) -> Token2WavODE:
    """The engine's runner on a whole ODE padded as the CUDA graphs pad it (``capture``: tries to capture)."""
    graphs = Token2WavGraphs(engine.family, max_rows=32, capture=capture, pad=True)
    graphs.ode = Token2WavODE(graphs)
    engine.runner.graphs = graphs
    return graphs.ode


def _close(a, b, tol=TOL):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert p.shape == q.shape
        assert (p - q).abs().max() < tol
        assert p.abs().max() > 0.1                          # a mel, not zeros


def _requests():
    cases = ((10, "Ethan"), (23, "Chelsie"), (37, "Ethan"))
    return ([SpeechInput(random_codes(n, n), v) for n, v in cases],
            [DiffusionParams(seed=s, num_inference_steps=STEPS) for s in (1, 2, 3)])


def test_whole_utterances_equal_the_step_path(whole, stepwise):
    """Three requests (20, 46, 74 frames, CFG on) together: the eager whole ODE, unpadded and padded to the
    graphs' buckets (8 rows x 96 frames), against one RK4 evaluation per engine step."""
    speech, params = _requests()
    ref = _mels(stepwise, speech, params)
    steps_before = whole.engine_stats()["steps"]
    _close(_mels(whole, speech, params), ref)
    assert whole.engine_stats()["steps"] - steps_before == 4 * (STEPS - 1)      # counted as the forwards
    saved = whole.runner.graphs
    try:
        ode = _padded(whole)
        _close(_mels(whole, speech, params), ref)
    finally:
        whole.runner.graphs = saved
    assert ode.eager_runs == 1 and ode.replays == 0 and not ode.graphs
    assert set(ode.ios) == {ODEShape(4, 96, STEPS, -1.0, 0.5, True)}       # 3 requests -> 4, CFG: 8 rows


def test_a_batch_finishes_in_one_engine_step(whole):
    """Requests at their first evaluation run to their end in one step (events: one progress per evaluation, then
    done); groups of different (num_steps, guidance) each run their whole ODE in that step, no CFG included."""
    speech, _ = _requests()
    params = [DiffusionParams(seed=1, num_inference_steps=STEPS), DiffusionParams(seed=2, num_inference_steps=4),
              DiffusionParams(seed=3, num_inference_steps=STEPS, guidance_scale=0.0)]
    reqs = [whole.add_request(None, p, speech=s, output_type="latent") for s, p in zip(speech, params)]
    events = whole.step()
    assert all(r.is_finished for r in reqs)
    assert events == [(r, "progress") for r in reqs for _ in range(r.step_idx)] + [(r, "done") for r in reqs]
    assert [r.step_idx for r in reqs] == [4 * (STEPS - 1), 12, 4 * (STEPS - 1)]
    for r, s, p in zip(reqs, speech, params):
        alone = _mels(whole, [s], [p])[0]
        assert (r.images[0] - alone).abs().max() < TOL


def test_longer_inputs_than_the_graph_limit_take_the_step_path(whole, stepwise, monkeypatch):
    """With the graphs' limit at 48 frames, the 74-frame request steps one evaluation per engine step beside the
    two shorter ones' whole ODE (first step); all three equal the step path."""
    import omni_ray.dit.token2wav_ode as ode_module

    monkeypatch.setattr(ode_module, "MAX_GRAPH_FRAMES", 48)
    speech, params = _requests()
    ref = _mels(stepwise, speech, params)
    saved = whole.runner.graphs
    try:
        ode = _padded(whole)
        reqs = [whole.add_request(None, p, speech=s, output_type="latent") for s, p in zip(speech, params)]
        whole.step()
        assert [r.is_finished for r in reqs] == [True, True, False] and reqs[2].step_idx == 1
        steps = 1
        while not reqs[2].is_finished:
            whole.step()
            steps += 1
    finally:
        whole.runner.graphs = saved
    assert steps == 4 * (STEPS - 1) and ode.eager_runs == 1
    assert set(ode.ios) == {ODEShape(2, 48, STEPS, -1.0, 0.5, True)}
    _close([r.images[0] for r in reqs], ref)


def test_stream_windows_equal_the_step_path(whole, stepwise):
    """A stream's windows, Qwen's plan (96 and 76 frames) and the low-latency first chunk's (24, 96, 76), all
    in one batch, against the step path: the mels within 1e-5."""
    fam = whole.family
    codes, noise = random_codes(50, 4), stream_noise(fam, 7, 100)
    speech = []
    for plan in (ChunkPlan.for_family(fam), ChunkPlan.for_family(fam, LOW)):
        speech += [w.speech for w in SpeechStream(fam, "Ethan", noise=noise, plan=plan).push(codes, finished=True)]
    assert sorted(s.noise.shape[0] for s in speech) == [24, 76, 76, 96, 96]
    params = [DiffusionParams(seed=0, num_inference_steps=STEPS)] * len(speech)
    ref = _mels(stepwise, speech, params)
    _close(_mels(whole, speech, params), ref)
    saved = whole.runner.graphs
    try:
        _padded(whole)
        _close(_mels(whole, speech, params), ref)
    finally:
        whole.runner.graphs = saved


def test_a_first_window_runs_alone(token2wav_ckpt, whole, monkeypatch):
    """``token2wav_first_window_alone``: an ODE whose batch holds a stream's first window runs under the process's
    exclusive lock (AR engine steps wait for it), the later windows' ODEs do not; the mels are the same."""
    import contextlib

    import omni_ray.dit.token2wav_ode as ode_mod

    held = []

    @contextlib.contextmanager
    def recorded():
        held.append(1)
        yield

    monkeypatch.setattr(ode_mod, "exclusive_lock", recorded)
    alone = make_engine(str(token2wav_ckpt), token2wav_first_window_alone=True)
    fam = alone.family
    windows = SpeechStream(fam, "Ethan", noise=stream_noise(fam, 7, 100),
                           plan=ChunkPlan.for_family(fam, LOW)).push(random_codes(50, 4), finished=True)
    assert [w.speech.first for w in windows] == [True] + [False] * (len(windows) - 1)
    params = [DiffusionParams(seed=0, num_inference_steps=STEPS)]
    for w in windows:
        held.clear()
        _close(_mels(alone, [w.speech], params), _mels(whole, [w.speech], params))
        assert len(held) == w.speech.first
    assert alone.runner.graphs.ode.alone_runs == 1 and whole.runner.graphs.ode.alone_runs == 0


def test_a_failed_capture_falls_back_to_the_eager_ode(whole, stepwise, caplog):
    """Capture on the CPU fails (no CUDA): logged once, then each failed shape runs the whole ODE eagerly."""
    speech, params = _requests()
    ref = _mels(stepwise, speech, params)
    saved = whole.runner.graphs
    try:
        ode = _padded(whole, capture=True)
        with caplog.at_level(logging.WARNING, logger="omni_ray.dit.token2wav_ode"):
            mels = _mels(whole, speech, params)
            alone = _mels(whole, speech[:1], params[:1])[0]
    finally:
        whole.runner.graphs = saved
    _close(mels, ref)
    assert (alone - ref[0]).abs().max() < TOL
    assert ode.failed == {ODEShape(4, 96, STEPS, -1.0, 0.5, True), ODEShape(1, 48, STEPS, -1.0, 0.5, True)}
    assert ode.replays == 0 and ode.eager_runs == 2 and not ode.graphs
    assert len([r for r in caplog.records if "whole-ODE CUDA graph capture failed" in r.message]) == 1


# ----------------------------------------------------------------------------------------------- GPU
def _cuda_engine(ckpt, **kw) -> DiTEngine:
    return DiTEngine(DiTEngineConfig(model=ModelConfig(path=str(ckpt)), device="cuda", **kw))


def _gpu_cases():
    cases = ((10, "Ethan"), (23, "Chelsie"), (37, "Ethan"), (72, "Ethan"))
    return ([SpeechInput(random_codes(n, n), v) for n, v in cases],
            [DiffusionParams(seed=s, num_inference_steps=STEPS) for s in (1, 2, 3, 4)])


def _windows(fam):
    codes, noise = random_codes(150, 9), stream_noise(fam, 7, 300)
    speech = []
    for plan in (ChunkPlan.for_family(fam), ChunkPlan.for_family(fam, LOW)):
        speech += [w.speech for w in SpeechStream(fam, "Ethan", noise=noise, plan=plan).push(codes, finished=True)]
    return speech, [DiffusionParams(seed=0, num_inference_steps=STEPS)] * len(speech)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ode_graphs_equal_eager(token2wav_ckpt):
    """Whole utterances (4 batched, one alone) and stream windows (both plans): the captured whole ODE against
    the eager engine (cuda_graphs false) and the per-forward graphs (token2wav_whole_ode false), within 1e-4."""
    graphed = _cuda_engine(token2wav_ckpt)
    eager = _cuda_engine(token2wav_ckpt, cuda_graphs=False)
    forwards = _cuda_engine(token2wav_ckpt, token2wav_whole_ode=False)
    speech, params = _gpu_cases()
    windows = _windows(graphed.family)
    for s, p in ((speech, params), (speech[:1], params[:1]), windows):
        g = _mels(graphed, s, p)
        _close(g, _mels(eager, s, p), 1e-4)
        _close(g, _mels(forwards, s, p), 1e-4)
    stats = graphed.engine_stats()
    assert stats["ode_graphs"] >= 2 and stats["ode_graph_replays"] >= 3 and stats["cuda_graph_replays"] == 0
    assert eager.engine_stats()["ode_graph_replays"] == 0 and forwards.engine_stats()["cuda_graph_replays"] > 0
    before = stats["ode_graph_replays"]
    _close(_mels(graphed, speech, params), _mels(eager, speech, params), 1e-4)       # replayed, not recaptured
    assert graphed.engine_stats()["ode_graph_replays"] == before + 1
    assert graphed.engine_stats()["ode_graphs"] == stats["ode_graphs"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_lower_precision_ode_graphs_near_fp32(token2wav_ckpt, precision):
    """token2wav_precision inside the whole-ODE graph: relative rms of the mel difference to fp32 below 1e-2 (as
    test_omni_token2wav_graphs.py states it), and not fp32 itself (bf16)."""
    low, fp32 = _cuda_engine(token2wav_ckpt, token2wav_precision=precision), _cuda_engine(token2wav_ckpt)
    speech, params = _gpu_cases()
    for a, b in zip(_mels(low, speech, params), _mels(fp32, speech, params)):
        assert a.dtype == torch.float32
        rel = float(((a - b).pow(2).mean() / b.pow(2).mean()).sqrt())
        assert rel < 1e-2, rel
        if precision == "bf16":
            assert rel > 1e-5, rel
    assert low.engine_stats()["ode_graph_replays"] > 0
    assert not torch.backends.cuda.matmul.allow_tf32          # the switch is restored after the capture


def test_the_stage_warms_every_ode_shape_its_windows_take(token2wav_ckpt):
    """``Token2WavODE.warmup`` (the token2wav stage's start) visits each whole-ODE shape the plan's windows can
    take: every row bucket up to the engine's batch size x every frame bucket up to the longest window, at the engine's
    default steps. Streams of several lengths fed at once (windows batched every way) then meet no shape it did
    not visit, so no capture falls inside serving. On the CPU the captures are forced on: each fails and its shape
    lands in ``failed``, the set of shapes tried (on CUDA they land in ``graphs``)."""
    import asyncio

    from omni_ray.dit import AsyncDiTEngine
    from omni_ray.stages.requests import SpeechRequest
    from omni_ray.stages.token2wav import Token2WavStageEngine

    config = make_engine(str(token2wav_ckpt)).config.model_copy(
        update={"max_batch_size": 4, "default_steps": STEPS, "token2wav_stream": LOW})
    lengths = (7, 61, 100)                                   # codes: 1, 3 and 4 windows

    async def run():
        stage = Token2WavStageEngine(config, engine=AsyncDiTEngine(config))
        ode = _padded(stage.engine.engine, capture=True)
        stage.start()                                        # warms
        tried = set(ode.failed)
        reqs = [SpeechRequest(f"w-{n}", "Ethan", DiffusionParams(seed=n)) for n in lengths]
        outs = [stage.generate(r) for r in reqs]
        try:
            firsts = [asyncio.ensure_future(anext(o)) for o in outs]
            for r, n in zip(reqs, lengths):
                await stage.feed(r.request_id, random_codes(n, n).tolist(), True)
            got = [[await f] + [d async for d in o] for f, o in zip(firsts, outs)]
        finally:
            for o in outs:
                await o.aclose()
            await stage.engine.shutdown()
        return ode, tried, got

    ode, tried, got = asyncio.run(run())
    assert [len(d) for d in got] == [1, 3, 4] and all(d[-1]["finished"] for d in got)
    # the plan's windows: [0, 24), [0, 96), then 144 frames (48 back, 72 own, 24 ahead): frame buckets 48, 96, 144
    assert {(s.requests, s.frames, s.num_steps) for s in tried} == {(r, t, STEPS) for r in (1, 2, 4)
                                                                    for t in (48, 96, 144)}
    assert len(tried) == 9 and ode.eager_runs > 9                # the streams ran whole ODEs too
    assert ode.failed == tried and not ode.graphs             # the streams met no shape the warm-up had not tried
