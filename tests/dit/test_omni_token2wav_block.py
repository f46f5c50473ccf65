"""token2wav's fused DiT forward (omni_ray/dit/families/qwen2_5_omni_token2wav_block.py).

CPU (float32): ``Token2WavBlocks`` equals the layer-by-layer forward (transformers' ``DiTDecoderLayer``s, which
the family's other tests hold equal to ``Qwen2_5OmniToken2WavDiTModel``) on rows of different lengths with
padded rows, at several times; one ``prepare`` serves forwards at different times; whole-ODE mels of an engine
with ``token2wav_fused_forward`` on equal those with it off.
GPU (run by the lead): bf16 fused within the stated tolerance of fp32 and no farther from it than bf16 layer by
layer; compiled equals eager.
"""

import pytest
import torch

from omni_ray.dit import DiffusionParams, SpeechInput
from omni_ray.dit.families.qwen2_5_omni_token2wav_block import Token2WavBlocks
from tests.dit.conftest import make_engine
from tests.dit.omni_token2wav_utils import random_codes


def _inputs(fam, lengths: list[int], T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    R, C = len(lengths), fam.caption_dim
    x = torch.randn(R, T, fam.mel_dim, generator=g)
    ctx = torch.randn(R, T, C, generator=g)
    lens = torch.tensor(lengths)
    pad = torch.arange(T)[None, :, None] >= lens[:, None, None]
    return x.masked_fill(pad, 0.0), ctx.masked_fill(pad, 0.0), lens


@pytest.fixture(scope="module")
def family(token2wav_ckpt):
    return make_engine(str(token2wav_ckpt), token2wav_fused_forward=False).family


def test_fused_forward_equals_the_layers(family):
    fam = family
    blocks = Token2WavBlocks(fam.transformer, fam._block_diff)
    T = 4 * fam.block_size
    x, ctx, lens = _inputs(fam, [T, T - 5, fam.block_size + 3, 0], T)     # a full row, ragged ones, a padded row
    prepared = blocks.prepare(ctx, lens)
    for t in (0.0, 0.37, 0.93):
        tt = torch.full((4,), t)
        ref = fam.forward(x, tt, ctx, lens, None)
        got = blocks.forward(x, tt, prepared)
        assert got.shape == ref.shape and got.dtype == torch.float32
        for r, n in enumerate(lens.tolist()):
            n = n or T                                                      # a padded row: computed alike
            assert (got[r, :n] - ref[r, :n]).abs().max() < 1e-5
        assert ref[:3].abs().max() > 0.1                                    # a prediction, not zeros
    # the stacked weights are the transformer's own (its linears are views into them): nothing stored twice
    first = fam.transformer.transformer_blocks[0]
    assert first.attn_norm.linear.weight.data_ptr() == blocks.mod_w.data_ptr()
    assert first.attn.to_q.weight.data_ptr() == blocks.weights[0][0].data_ptr()
    assert first.attn.to_v.bias.data_ptr() > blocks.weights[0][1].data_ptr()


def test_modulations_made_once_per_ode_equal_per_forward_ones(family):
    """``prepare`` given every evaluation's times makes their modulations at once (``forward(..., step=e)``),
    equal to making them per forward; past ``max_mod_bytes`` it leaves them to the forwards."""
    fam = family
    blocks = Token2WavBlocks(fam.transformer, fam._block_diff)
    x, ctx, lens = _inputs(fam, [48, 40, 48], 48, seed=4)
    times = torch.rand(5, 3)
    once, per = blocks.prepare(ctx, lens, times), blocks.prepare(ctx, lens)
    assert once.mods.shape[:2] == (5, 3) and per.mods is None
    for e in range(5):
        assert (blocks.forward(x, times[e], once, e) - blocks.forward(x, times[e], per)).abs().max() < 1e-5
    assert blocks.prepare(ctx, lens, times, max_mod_bytes=1024).mods is None


def test_fused_forward_without_lengths(family):
    fam = family
    blocks = Token2WavBlocks(fam.transformer, fam._block_diff)
    x, ctx, _ = _inputs(fam, [2 * fam.block_size] * 2, 2 * fam.block_size, seed=1)
    t = torch.tensor([0.2, 0.6])
    ref = fam.forward(x, t, ctx, None, None)
    assert (blocks.forward(x, t, blocks.prepare(ctx, None)) - ref).abs().max() < 1e-5


def test_fused_whole_odes_equal_the_layered_ones(token2wav_ckpt, family):
    fused = make_engine(str(token2wav_ckpt))
    assert fused.runner.graphs.blocks is not None and family is not fused.family
    layered = make_engine(str(token2wav_ckpt), token2wav_fused_forward=False)
    assert layered.runner.graphs.blocks is None
    speech = [SpeechInput(random_codes(n, seed=n)) for n in (30, 17, 41)]
    params = [DiffusionParams(seed=i, num_inference_steps=4) for i in range(3)]
    a = fused.generate(params=params, speech=speech, output_type="latent", use_tqdm=False)
    b = layered.generate(params=params, speech=speech, output_type="latent", use_tqdm=False)
    for p, q in zip(a, b):
        assert p.shape == q.shape and (p - q).abs().max() < 1e-5 and q.abs().max() > 0.1


def test_a_failing_compile_runs_the_block_eagerly(family, caplog):
    fam = family
    blocks = Token2WavBlocks(fam.transformer, fam._block_diff)
    failing = Token2WavBlocks(fam.transformer, fam._block_diff)

    def broken(*args):
        raise RuntimeError("no compiler here")

    failing.compiled = broken
    x, ctx, lens = _inputs(fam, [48, 30], 48, seed=3)
    t = torch.tensor([0.4, 0.8])
    with caplog.at_level("WARNING"):
        got = failing.forward(x, t, failing.prepare(ctx, lens))
    assert failing.compiled is None and torch.equal(got, blocks.forward(x, t, blocks.prepare(ctx, lens)))
    assert len([r for r in caplog.records if "torch.compile of the DiT block failed" in r.message]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_fused_near_fp32_and_compiled_equals_eager(token2wav_ckpt):
    """Relative rms to fp32 below 1e-2 (the bf16 tolerance of test_omni_token2wav_ode.py) and within 1.5x of bf16
    layer by layer; the compiled block within bf16 rounding of the eager one."""
    from omni_ray.dit.token2wav_graphs import Token2WavGraphs

    fam = make_engine(str(token2wav_ckpt), token2wav_fused_forward=False).family
    fam_cuda = type(fam).load(token2wav_ckpt, torch.device("cuda"), torch.float32)
    T = 4 * fam.block_size
    x, ctx, lens = (v.cuda() for v in _inputs(fam_cuda, [T, T - 7, 30], T, seed=2))
    t = torch.tensor([0.1, 0.5, 0.9], device="cuda")

    def run(**kw):
        g = Token2WavGraphs(fam_cuda, max_rows=8, capture=False, pad=False, **kw)
        return g._forward(x, t, ctx, lens)

    def rel(a, b):
        m = torch.arange(T, device="cuda")[None, :, None] < lens[:, None, None]
        return float(((a - b)[m.expand_as(a)].pow(2).mean() / b[m.expand_as(b)].pow(2).mean()).sqrt())

    ref = run(precision="fp32", fused=False)
    assert rel(run(precision="fp32", fused=True), ref) < 1e-5
    fused, layered = run(precision="bf16", fused=True), run(precision="bf16", fused=False)
    assert rel(fused, ref) < 1e-2 and rel(fused, ref) < 1.5 * rel(layered, ref)
    compiled = run(precision="bf16", fused=True, compile=True)
    assert rel(compiled, fused) < 1e-2
