"""Our forward over the diffusers modules' pieces equals the modules' own forward."""

import torch

from tests.dit.conftest import rel_diff


def _conds(fam, prompts):
    embeds, mask = fam.encode_prompt(prompts)
    conds = []
    for e, m in zip(embeds, mask):
        if fam.supports_caption_mask:           # as the engine does: drop the right padding
            n = int(m.nonzero().max()) + 1
            e, m = e[:n], m[:n]
        conds.append(fam.project(e, m))
    return embeds, mask, fam.batch_cond(conds)


def test_pixart_forward_matches_diffusers(pixart):
    fam = pixart.family
    torch.manual_seed(0)
    embeds, mask, (ctx, bias, pooled) = _conds(fam, ["a red cat", "two dogs playing in the snow at night"])
    assert int(mask[0].sum()) < mask.shape[1]          # the captions really differ in length
    x = torch.randn(2, fam.in_channels, 8, 12)
    t = torch.tensor([999.0, 420.0])
    ours = fam.forward(x, t, ctx, bias, pooled)
    ref = fam.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert ours.shape == ref.shape == (2, 8, 8, 12)
    assert rel_diff(ours, ref) < 1e-5
    assert all(b.fast for b in fam.block_fns)        # the lean block path was the one tested


def test_sd3_forward_matches_diffusers(sd3):
    fam = sd3.family
    torch.manual_seed(0)
    embeds, _, (ctx, bias, pooled) = _conds(fam, ["a red cat", "two dogs"])
    x = torch.randn(2, fam.in_channels, 12, 8)
    t = torch.tensor([1000.0, 333.3])
    ours = fam.forward(x, t, ctx, bias, pooled)
    ref = fam.transformer(hidden_states=x, encoder_hidden_states=embeds[:, 1:], timestep=t,
                          pooled_projections=embeds[:, 0, :fam.pooled_dim], return_dict=False)[0]
    assert ours.shape == ref.shape == (2, 16, 12, 8)
    assert rel_diff(ours, ref) < 1e-5


def test_rows_are_independent_of_their_batch(pixart):
    """A row's output does not depend on which rows share its forward (what per-sample caching relies on)."""
    fam = pixart.family
    torch.manual_seed(1)
    _, _, (ctx, bias, pooled) = _conds(fam, ["a red cat", "a lighthouse at dusk, oil painting", "x"])
    x = torch.randn(3, fam.in_channels, 8, 8)
    t = torch.tensor([900.0, 500.0, 10.0])
    full = fam.forward(x, t, ctx, bias, pooled)
    one = fam.forward(x[1:2], t[1:2], ctx[1:2], bias[1:2], None)
    assert rel_diff(one[0], full[1]) < 1e-5
