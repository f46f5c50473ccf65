"""Qwen2.5-Omni token2wav on the DiT engine against transformers' token2wav (float32, CPU).

Tolerance: 1e-5 absolute on mels (values of order 1-5; measured <= 1e-6) and 3e-5 on waveforms (rms
~0.14; measured <= 6.3e-6: the vocoder's ~240x upsampling amplifies the mel's last-bit differences).
The engine runs transformers' own modules in the reference's order of operations; what differs is the
batch (padded rows, both CFG halves of several requests in one forward), whose reductions may round
differently.
"""

import asyncio

import numpy as np
import pytest
import torch

from omni_ray.dit import AsyncDiTEngine, DiffusionParams, SpeechInput
from omni_ray.dit.rk4 import RK4FlowScheduler
from omni_ray.errors import InvalidRequestError
from omni_ray.testing import resolve_model
from tests.dit.conftest import make_engine
from tests.dit.omni_token2wav_utils import random_codes, reference_speech, reference_token2wav

TOL = 1e-5
WAVE_TOL = 3e-5
STEPS = 3                      # time points: 2 RK4 intervals, 8 forwards (the reference's default is 10)


@pytest.fixture(scope="module")
def engine(token2wav_ckpt):
    return make_engine(str(token2wav_ckpt))


@pytest.fixture(scope="module")
def reference(token2wav_ckpt):
    return reference_token2wav(token2wav_ckpt)


def test_rk4_stepper_equals_reference_solver():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

    def f(t, y):
        return torch.sin(3 * t) * y.flip(-1) - 0.5 * y
    y0 = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    sched = RK4FlowScheduler(7, -1.0)
    expected = RungeKutta4ODESolver(f, y0).integrate(sched.grid)[-1]
    y = y0
    assert len(sched.timesteps) == 4 * 6
    for t in sched.timesteps:
        y = sched.step(f(torch.tensor(float(t)), y), t, y)[0]
    assert torch.equal(y, expected)


def test_bad_requests_are_refused_and_the_engine_keeps_working(engine):
    codes = random_codes(5, 0)
    cases = [
        (dict(speech=SpeechInput(codes, voice="Nobody")), "voice"),
        (dict(speech=SpeechInput([1, 2, 65])), "codes"),                  # the codec has 64 + 1 rows: 0..64
        (dict(speech=SpeechInput([1, -1])), "codes"),
        (dict(speech=SpeechInput(torch.rand(4))), "codes"),
        (dict(speech=SpeechInput(torch.ones(4, dtype=torch.bool))), "codes"),
        (dict(speech=SpeechInput([1.0, 2.0])), "codes"),
        (dict(speech=SpeechInput([])), "codes"),
        (dict(speech=SpeechInput(torch.zeros(20000, dtype=torch.long))), "codes"),   # past max_position_embeddings
        (dict(speech=SpeechInput(codes, noise=torch.zeros(3, 80))), "noise"),
        (dict(speech=SpeechInput(codes), params=DiffusionParams(num_inference_steps=1)), "num_inference_steps"),
        (dict(speech=SpeechInput(codes), params=DiffusionParams(height=64)), "height"),
        (dict(speech=SpeechInput(codes), params=DiffusionParams(cache="fbcache")), "cache"),
        (dict(speech=SpeechInput(codes), params=DiffusionParams(num_images_per_prompt=2)), "num_images_per_prompt"),
        (dict(speech=SpeechInput(codes), output_type="wav"), "output_type"),
        (dict(speech=SpeechInput(codes), prompt="hello"), "prompt"),
        (dict(speech=SpeechInput(codes), prompt_embeds=torch.zeros(2, 8)), "prompt_embeds"),
        (dict(prompt="hello"), "speech"),
    ]
    for kw, param in cases:
        with pytest.raises(InvalidRequestError) as err:
            engine.make_request(kw.pop("prompt", None), kw.pop("params", None), **kw)
        assert err.value.param == param, (kw, err.value)
    assert engine.family.resolve_voice("chelsie") == "Chelsie"          # case-insensitive, as OpenAI's voice names
    assert torch.equal(engine.family.check_codes(np.array([3, 4], dtype=np.int32)), torch.tensor([3, 4]))
    mel = engine.generate(params=DiffusionParams(seed=0, num_inference_steps=2), speech=SpeechInput(codes),
                          output_type="latent", use_tqdm=False)[0]
    assert mel.shape == (10, 80) and torch.isfinite(mel).all()


def test_mel_and_waveform_equal_transformers_batched(engine, reference):
    """Two code lengths (16 and 28 mel frames: one and two attention blocks) x both voices, all four
    requests in each forward (padded to the longest)."""
    model, voices = reference
    cases = [(n, voice, 10 * n + k) for n in (8, 14) for k, voice in enumerate(("Chelsie", "Ethan"))]
    speech = [SpeechInput(random_codes(n, seed), voice) for n, voice, seed in cases]
    params = [DiffusionParams(seed=seed, num_inference_steps=STEPS) for _, _, seed in cases]
    forwards = engine.engine_stats()["steps"]
    mels = engine.generate(params=params, speech=speech, output_type="latent", use_tqdm=False)
    stats = engine.engine_stats()
    assert stats["steps"] - forwards == 4 * (STEPS - 1)                 # every forward held all four requests
    assert stats["last_batch_requests"] == 4 and stats["last_batch_rows"] == 8    # CFG doubles the rows
    waves = engine.generate(params=params, speech=speech, use_tqdm=False)
    hop = 240
    for (n, voice, seed), s, mel, wave in zip(cases, speech, mels, waves):
        ref_mel, ref_wave = reference_speech(model, voices, s.codes, voice, seed, STEPS)
        assert mel.shape == ref_mel.shape == (2 * n, 80)
        assert isinstance(wave, np.ndarray) and wave.dtype == np.float32 and wave.shape == (2 * n * hop,)
        assert (mel - ref_mel).abs().max() < TOL, (n, voice)
        assert np.abs(wave - ref_wave.numpy()).max() < WAVE_TOL, (n, voice)
        assert 0.01 < wave.std() < 0.9                                # a waveform, not silence or the clamp
    assert engine.family.sample_rate == 24000


def test_batched_equals_alone(engine):
    short, long_ = SpeechInput(random_codes(6, 1), "Ethan"), SpeechInput(random_codes(14, 2), "Chelsie")
    params = DiffusionParams(seed=5, num_inference_steps=STEPS)
    together = engine.generate(params=params, speech=[short, long_], use_tqdm=False)
    assert engine.engine_stats()["max_batch_size"] >= 2
    alone = engine.generate(params=params, speech=short, use_tqdm=False)[0]
    assert np.abs(together[0] - alone).max() < WAVE_TOL


def test_without_guidance_and_sway(engine, reference):
    """guidance_scale below 1e-5: no CFG half (the reference's other branch); sway None: a uniform grid."""
    model, voices = reference
    codes = random_codes(10, 3)
    forwards = engine.engine_stats()["steps"]
    mel = engine.generate(params=DiffusionParams(seed=1, num_inference_steps=STEPS, guidance_scale=0.0),
                          speech=SpeechInput(codes, "Ethan", sway_coefficient=None), output_type="latent",
                          use_tqdm=False)[0]
    assert engine.engine_stats()["last_batch_rows"] == 1
    assert engine.engine_stats()["steps"] - forwards == 4 * (STEPS - 1)
    torch.manual_seed(1)
    with torch.no_grad():
        ref = model.code2wav_dit_model.sample(voices["Ethan"]["cond"], voices["Ethan"]["ref_mel"], codes[None],
                                              num_steps=STEPS, guidance_scale=0.0, sway_coefficient=None)
    assert (mel - ref[0].T).abs().max() < TOL


def test_loads_the_omni_checkpoint_as_transformers_does():
    """The engine over tiny:qwen2.5-omni itself (thinker, talker and token2wav in one safetensors file,
    spk_dict.pt beside it) equals ``Qwen2_5OmniForConditionalGeneration.from_pretrained(dir).token2wav``."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    path = resolve_model("tiny:qwen2.5-omni")
    eng = make_engine(str(path))
    omni = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    assert sorted(omni.speaker_map) == eng.family.voices
    codes = random_codes(12, 4)
    mel = eng.generate(params=DiffusionParams(seed=2, num_inference_steps=2), speech=SpeechInput(codes, "Ethan"),
                       output_type="latent", use_tqdm=False)[0]
    ref_mel, _ = reference_speech(omni.token2wav, omni.speaker_map, codes, "Ethan", 2, 2)
    assert (mel - ref_mel).abs().max() < TOL


def test_async_engine_streams_progress_then_the_waveform(token2wav_ckpt):
    async def run():
        eng = AsyncDiTEngine(str(token2wav_ckpt), device="cpu")
        try:
            events = [ev async for ev in eng.generate(None, DiffusionParams(seed=0, num_inference_steps=2), "sp-1",
                                                      speech=SpeechInput([1, 2, 3], "Chelsie"))]
            with pytest.raises(InvalidRequestError) as err:
                async for _ in eng.generate(None, DiffusionParams(), "sp-2", speech=SpeechInput([1], "nobody")):
                    pass
            assert err.value.param == "voice"
            return events
        finally:
            await eng.shutdown()
    events = asyncio.run(run())
    assert [e.kind for e in events] == ["progress"] * 4 + ["done"]
    assert [e.step for e in events] == [1, 2, 3, 4, 4]           # one engine step: the whole ODE (token2wav_ode.py)
    assert events[-1].images[0].shape == (6 * 240,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_transformers_on_cuda(token2wav_ckpt):
    """The same on the GPU (float32 both sides; tolerance 1e-4: cuDNN / SDPA kernels of other batch shapes)."""
    from omni_ray.config import DiTEngineConfig, ModelConfig
    from omni_ray.dit import DiTEngine

    eng = DiTEngine(DiTEngineConfig(model=ModelConfig(path=str(token2wav_ckpt)), device="cuda"))
    model, voices = reference_token2wav(token2wav_ckpt)
    model = model.cuda()
    voices = {k: {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in v.items()} for k, v in voices.items()}
    speech = [SpeechInput(random_codes(n, n), "Ethan") for n in (8, 14)]
    waves = eng.generate(params=DiffusionParams(seed=4, num_inference_steps=STEPS), speech=speech, use_tqdm=False)
    for s, wave in zip(speech, waves):
        _, ref = reference_speech(model, voices, s.codes.cuda(), "Ethan", 4, STEPS)
        assert np.abs(wave - ref.cpu().numpy()).max() < 1e-4
