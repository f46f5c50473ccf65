"""TeaCache's fitted rescaling polynomials for Wan2.1, as their authors publish them (TeaCache4Wan2.1's
``teacache_generate.py``, also in ComfyUI-TeaCache's ``nodes.py``), and which one a checkpoint gets.

What they were fitted on: for Wan, TeaCache does not watch block 0's modulated input (its default for
image DiTs) but the **timestep embedding** ``e = time_embedding(sinusoidal(t))`` (diffusers'
``condition_embedder`` ``temb`` [B, dim]): the polynomial maps the relative L1 change of ``e`` between
consecutive steps to the predicted relative change of the model's output. These are the fits of the
plain mode (TeaCache4Wan2.1 without ``--use_ret_steps``: the first and the last step always computed,
as the engine's step cache does); the ``--use_ret_steps`` fits watch the projected ``e0`` [B, 6, dim]
and compute the first 5 steps, so they are not used here. The engine applies a fit as published up to its
first peak (``step_cache.rescale``: the 1.3B fit dips below its value at 0 first; the 14B and I2V fits are
negative for small distances, as published); past that peak a large change still counts as large.

Which fit: chosen from the transformer's config (width, depth, FFN, input channels, CLIP image width),
single-expert Wan2.1 checkpoints only (Wan2.2's A14B experts share the 14B config but not its weights;
TI2V-5B has no published fit). The I2V 480P and 720P checkpoints have identical configs: their fits differ
by the resolution they were made at (832x480, 1280x720), so a request gets the one nearest its own size
(by pixel count, split at the geometric mean).
"""

from __future__ import annotations

# numpy order (highest power first), as published
T2V_1_3B = (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01)
T2V_14B = (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404)
I2V_14B_480P = (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01)
I2V_14B_720P = (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683)

# (heads * head_dim, num_layers, ffn_dim, in_channels, image_dim) of the fitted checkpoints
_T2V = {(1536, 30, 8960, 16, None): T2V_1_3B, (5120, 40, 13824, 16, None): T2V_14B}
_I2V = (5120, 40, 13824, 36, 1280)
_SPLIT_PIXELS = (480 * 832 * 720 * 1280) ** 0.5      # between the two I2V fits' resolutions


def config_key(cfg) -> tuple:
    """The fields of a ``WanTransformer3DModel`` config (object or dict) that tell the fitted checkpoints apart."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k))
    return (get("num_attention_heads") * get("attention_head_dim"), get("num_layers"), get("ffn_dim"),
            get("in_channels"), get("image_dim"))


def wan_polynomial(cfg, experts: int, height: int, width: int) -> tuple | None:
    """The published polynomial for a Wan checkpoint of transformer config ``cfg`` (``experts``: 2 for
    Wan2.2 A14B) at a request's size, or None (no fit: the raw distance counts)."""
    if experts != 1:
        return None
    key = config_key(cfg)
    if key == _I2V:
        return I2V_14B_480P if height * width <= _SPLIT_PIXELS else I2V_14B_720P
    return _T2V.get(key)
