"""Caption packing (omni_ray/dit/caption_pack.py): the caption stream's GEMMs over real caption tokens only.
The positions a pack lists, the packed GEMM against the padded one, and Qwen-Image's engine with packing on
against it off (tiny checkpoint, fp32: the same latents, alone and in mixed batches, with a step cache)."""

import pytest
import torch

from omni_ray.dit.caption_pack import pack_positions, packed


def test_a_pack_lists_every_real_token_once_then_padding_up_to_its_bucket():
    lens, T = (5, 1, 3), 8
    pos = pack_positions(lens, T, multiple=4)
    real = [0, 1, 2, 3, 4, 8, 16, 17, 18]
    assert pos[:9] == real and len(pos) == 12 and len(set(pos)) == 12             # 9 real, bucket of 4 -> 12
    assert all(p not in real and 0 <= p < len(lens) * T for p in pos[9:])        # filled with padded positions
    padded_rows = pack_positions(lens, T, rows=4, multiple=4)                    # a CUDA graph's extra row
    assert padded_rows[:9] == real and len(padded_rows) == 12
    assert pack_positions((8, 7, 8), T, multiple=4) is None                      # 23 of 24 rows: no saving
    assert pack_positions(lens, T, multiple=20) is None                          # 20 of 24 rows: under 25% saved
    assert pack_positions((9, 2), 4, multiple=1) == [0, 1, 2, 3, 4, 5]           # lengths past T are cut at T


def test_packed_equals_the_padded_gemm_at_the_packed_positions_and_zero_elsewhere():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(6, 10)
    h = torch.randn(3, 8, 6, generator=g)
    pos = pack_positions((5, 1, 3), 8, multiple=4)
    pack = torch.tensor(pos)
    out = packed(lin, h, pack)
    full = lin(h).reshape(24, 10)
    flat = out.reshape(24, 10)
    torch.testing.assert_close(flat[pack], full[pack])
    rest = [p for p in range(24) if p not in pos]
    assert torch.count_nonzero(flat[rest]) == 0
    strided = torch.randn(3, 12, 6, generator=g)[:, 2:10]                        # a view, as the attention's half
    torch.testing.assert_close(packed(lin, strided, pack).reshape(24, 10)[pack], lin(strided).reshape(24, 10)[pack])
    assert packed(lin, h, None).equal(lin(h))


@pytest.fixture(scope="module")
def engines():
    from omni_ray.config import DiTEngineConfig, ModelConfig
    from omni_ray.dit import DiTEngine

    out = {}
    for on in (False, True):
        eng = DiTEngine(DiTEngineConfig(model=ModelConfig(path="tiny:qwen-image"), device="cpu", caption_packing=on))
        eng.family.pack_multiple = 4                # the tiny captions are a few tokens: pack them at that scale
        out[on] = eng
    return out


@pytest.mark.parametrize("cache", [None, {"method": "teacache", "threshold": 0.5}])
def test_engine_with_packed_captions_gives_the_unpacked_latents(engines, cache):
    """Requests with negative prompts of other lengths than their prompts, batched (and a step cache running
    subsets of the rows): packed caption GEMMs give the latents of the padded ones, and the packed path ran."""
    from omni_ray.dit import DiffusionParams

    g = torch.Generator().manual_seed(0)
    dim = engines[True].family.caption_dim
    embeds = [torch.randn(n, dim, generator=g) for n in (11, 12, 9)]
    negs = [torch.randn(2, dim, generator=g), None, torch.randn(1, dim, generator=g)]
    outs, packs = {}, {}
    for on, eng in engines.items():
        fam = eng.family
        calls = []
        pack_of = fam._pack
        fam._pack = lambda st, f=pack_of: calls.append(f(st)) or calls[-1]
        try:
            reqs = [eng.add_request(None, DiffusionParams(height=32, width=48, num_inference_steps=n, seed=i,
                                                          cache=cache),
                                    prompt_embeds=e, negative_prompt_embeds=ne, output_type="latent")
                    for i, (n, e, ne) in enumerate(zip((4, 3, 5), embeds, negs))]
            while not all(r.is_finished for r in reqs):
                eng.step()
        finally:
            del fam._pack
        outs[on] = [r.images[0] for r in reqs]
        packs[on] = [p for p in calls if p is not None]
    assert not packs[False] and packs[True]                  # packing on: some blocks ran on a pack
    for a, b in zip(outs[True], outs[False]):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5

