"""Qwen-Image / Qwen-Image-Edit on the DiT engine against diffusers' pipelines (tiny checkpoints, fp32,
caching off, same seed): the engine gets the reference's own prompt_embeds (its text encoder runs as an
AR stage in omni-ray, so the DiT family never loads it)."""

import numpy as np
import pytest
import torch
from PIL import Image

from omni_ray.config import DiTEngineConfig, ModelConfig
from omni_ray.dit import DiffusionParams, DiTEngine
from omni_ray.errors import InvalidRequestError
from omni_ray.testing import resolve_model

TOL = 1e-5        # fp32: latents relative to their largest value, pixels on [0, 1]
STEPS = 3


def _engine(name: str, **kw) -> DiTEngine:
    return DiTEngine(DiTEngineConfig(model=ModelConfig(path=name), device="cpu", **kw))


def _reference(engine: DiTEngine, cls_name: str, processor=None):
    """The diffusers pipeline over the engine's transformer and VAE, with the checkpoint's text encoder."""
    import diffusers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = engine.model_path
    f = engine.family
    kw = {"processor": processor} if processor is not None else {}
    pipe = getattr(diffusers, cls_name)(
        scheduler=type(f.base_scheduler).from_config(f.base_scheduler.config), vae=f.vae, transformer=f.transformer,
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"), **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def qwen():
    return _engine("tiny:qwen-image")


@pytest.fixture(scope="module")
def pipe(qwen):
    return _reference(qwen, "QwenImagePipeline")


@pytest.fixture(scope="module")
def embeds(pipe):
    """{text: (embeds [T, H], mask [T])} from the pipeline's encode_prompt (lengths differ)."""
    texts = ["a red fox in the snow", "blurry, low quality", "a lighthouse on a cliff above a stormy sea at night",
             "ugly"]
    out = {}
    for t in texts:
        e, m = pipe.encode_prompt([t], device="cpu")
        out[t] = (e[0], torch.ones(e.shape[1], dtype=torch.long) if m is None else m[0])
    assert len({e.shape[0] for e, _ in out.values()}) == len(texts)
    return out


def _run_pipe(pipe, embeds, prompt, negative, size, seed, steps=STEPS, **kw):
    """(final latents [N, 4C], images [H, W, 3]) of one pipeline call."""
    seen = {}

    def grab(p, i, t, cb):
        seen["latents"] = cb["latents"]
        return {}

    e, m = embeds[prompt]
    neg = {} if negative is None else {"negative_prompt_embeds": embeds[negative][0][None],
                                       "negative_prompt_embeds_mask": embeds[negative][1][None]}
    images = pipe(prompt_embeds=e[None], prompt_embeds_mask=m[None], height=size[0], width=size[1],
                  num_inference_steps=steps, true_cfg_scale=4.0, generator=torch.Generator().manual_seed(seed),
                  output_type="np", callback_on_step_end=grab, **neg, **kw).images
    return seen["latents"][0], images[0]


def _kw(embeds, prompt, negative):
    e, m = embeds[prompt]
    kw = {"prompt_embeds": e, "prompt_mask": m}
    if negative is not None:
        kw |= {"negative_prompt_embeds": embeds[negative][0], "negative_prompt_mask": embeds[negative][1]}
    return kw


def _rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("size", [(64, 96), (96, 64)])
@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_equals_pipeline(qwen, pipe, embeds, size, negative):
    prompt = "a red fox in the snow"
    ref_lat, ref_img = _run_pipe(pipe, embeds, prompt, negative, size, seed=5)
    params = DiffusionParams(height=size[0], width=size[1], num_inference_steps=STEPS, seed=5)
    lat = qwen.generate(None, params, output_type="latent", use_tqdm=False, **_kw(embeds, prompt, negative))[0]
    img = qwen.generate(None, params, output_type="np", use_tqdm=False, **_kw(embeds, prompt, negative))[0]
    assert lat.shape == ref_lat.shape == (size[0] * size[1] // 256, 64)
    assert img.shape == ref_img.shape == (*size, 3) and float(np.std(ref_img)) > 0.01
    assert _rel(lat, ref_lat) < TOL
    assert np.abs(img - ref_img).max() < TOL


def test_cfg_needs_a_negative(qwen, embeds):
    """guidance_scale plays true_cfg_scale: CFG (two rows) only with a negative and a scale > 1."""
    kw = _kw(embeds, "a red fox in the snow", None)
    plain = qwen.make_request(None, DiffusionParams(height=32, width=32), **kw)
    neg = qwen.make_request(None, DiffusionParams(height=32, width=32),
                            **_kw(embeds, "a red fox in the snow", "ugly"))
    off = qwen.make_request(None, DiffusionParams(height=32, width=32, guidance_scale=1.0),
                            **_kw(embeds, "a red fox in the snow", "ugly"))
    assert (plain.num_rows, neg.num_rows, off.num_rows) == (1, 2, 1)
    assert plain.guidance_scale == 4.0 and plain.num_steps == 50


def test_mixed_batch_equals_alone(qwen, embeds):
    """Different steps, seeds, prompt lengths, resolutions, one with CFG one without: each request's
    image in a shared batch equals the one it gets alone."""
    specs = [("a red fox in the snow", "blurry, low quality", (64, 96), 3, 1),
             ("a lighthouse on a cliff above a stormy sea at night", None, (64, 96), 2, 2),
             ("ugly", "a red fox in the snow", (64, 96), 4, 3),
             ("blurry, low quality", None, (96, 64), 3, 4)]

    def request(i):
        prompt, negative, size, steps, seed = specs[i]
        p = DiffusionParams(height=size[0], width=size[1], num_inference_steps=steps, seed=seed)
        return qwen.add_request(None, p, output_type="latent", **_kw(embeds, prompt, negative))

    alone = []
    for i in range(len(specs)):
        r = request(i)
        while not r.is_finished:
            qwen.step()
        alone.append(r.images[0])
    reqs = [request(i) for i in range(len(specs))]
    widest = 0
    while not all(r.is_finished for r in reqs):
        qwen.step()
        widest = max(widest, qwen.engine_stats()["last_batch_requests"])
    assert widest == 3                                  # the three 64x96 requests shared forwards
    for r, a in zip(reqs, alone):
        assert _rel(r.images[0], a) < TOL


def test_prompt_only_and_text_negative_are_refused(qwen, embeds):
    with pytest.raises(InvalidRequestError, match="AR stage") as err:
        qwen.generate("a red fox", DiffusionParams(height=32, width=32, num_inference_steps=1), use_tqdm=False)
    assert err.value.param == "prompt_embeds"
    with pytest.raises(InvalidRequestError, match="AR stage") as err:
        qwen.make_request(None, DiffusionParams(negative_prompt="ugly"), **_kw(embeds, "ugly", None))
    assert err.value.param == "negative_prompt"
    with pytest.raises(InvalidRequestError) as err:
        qwen.make_request(None, DiffusionParams(), **_kw(embeds, "ugly", None),
                          negative_prompt_embeds=torch.zeros(3, 7))
    assert err.value.param == "negative_prompt_embeds"
    with pytest.raises(InvalidRequestError) as err:
        qwen.make_request(None, DiffusionParams(), **_kw(embeds, "ugly", None), image=Image.new("RGB", (32, 32)))
    assert err.value.param == "image"
    assert qwen.encode_prompt.__self__ is qwen and not qwen.family.has_text_encoder


def test_text_encoder_is_not_loaded():
    from omni_ray.dit.families import QwenImageFamily
    from omni_ray.dit.loader import load_components

    _, comps = load_components(resolve_model("tiny:qwen-image"), torch.device("cpu"), torch.float32,
                               skip=QwenImageFamily.skip_components)
    assert comps["text_encoder"] is None and comps["tokenizer"] is None and comps["transformer"] is not None


@pytest.mark.parametrize("method, threshold", [("fbcache", 0.5), ("teacache", 0.6)])
def test_step_caches_skip(qwen, embeds, method, threshold):
    params = DiffusionParams(height=32, width=32, num_inference_steps=8, seed=0,
                             cache={"method": method, "threshold": threshold})
    kw = _kw(embeds, "a red fox in the snow", "ugly")
    req = qwen.add_request(None, params, output_type="latent", **kw)
    while not req.is_finished:
        qwen.step()
    full = qwen.generate(None, DiffusionParams(height=32, width=32, num_inference_steps=8, seed=0),
                         output_type="latent", use_tqdm=False, **kw)[0]
    assert 0 < req.cache_skips < 7
    assert torch.isfinite(req.images[0]).all() and _rel(req.images[0], full) < 0.5


# ----------------------------------------------------------------------------- edit
@pytest.fixture(scope="module")
def edit():
    return _engine("tiny:qwen-image-edit")


def test_edit_equals_pipeline(edit):
    from tests.ar.test_mm_encoders import auto_processor

    pipe = _reference(edit, "QwenImageEditPipeline", auto_processor(edit.model_path / "processor"))
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 96, 3), dtype=np.uint8))
    from omni_ray.dit.families.qwen_image import edit_image_size
    prompt_image = image.resize(edit_image_size(96, 48), Image.LANCZOS)
    e, m = pipe.encode_prompt("make it blue", image=prompt_image, device="cpu")
    ne, nm = pipe.encode_prompt("ugly", image=prompt_image, device="cpu")
    m = torch.ones(e.shape[:2], dtype=torch.long) if m is None else m
    nm = torch.ones(ne.shape[:2], dtype=torch.long) if nm is None else nm
    ref = pipe(image=image, prompt_embeds=e, prompt_embeds_mask=m, negative_prompt_embeds=ne,
               negative_prompt_embeds_mask=nm, height=64, width=96, num_inference_steps=2, true_cfg_scale=3.0,
               generator=torch.Generator().manual_seed(9), output_type="np").images[0]
    ours = edit.generate(None, DiffusionParams(height=64, width=96, num_inference_steps=2, seed=9, guidance_scale=3.0),
                         prompt_embeds=e[0], prompt_mask=m[0], negative_prompt_embeds=ne[0],
                         negative_prompt_mask=nm[0], image=image, output_type="np", use_tqdm=False)[0]
    assert ours.shape == ref.shape == (64, 96, 3) and float(np.std(ref)) > 0.01
    assert np.abs(ours - ref).max() < TOL


def test_edit_validates_the_image(edit):
    kw = {"prompt_embeds": torch.randn(5, edit.family.caption_dim)}
    with pytest.raises(InvalidRequestError) as err:
        edit.make_request(None, DiffusionParams(), **kw)                       # no image
    assert err.value.param == "image"
    for bad in (np.zeros((8, 8, 3)), Image.new("I;16", (64, 64)), Image.new("RGB", (10000, 2))):
        with pytest.raises(InvalidRequestError) as err:
            edit.make_request(None, DiffusionParams(), image=bad, **kw)
        assert err.value.param == "image"
    req = edit.make_request(None, DiffusionParams(), image=Image.new("RGBA", (300, 200)), **kw)
    assert (req.height, req.width) == (832, 1248)                              # the pipeline's default size


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache", [None, {"method": "fbcache", "threshold": 0.3},
                                   {"method": "teacache", "threshold": 0.5}])
@pytest.mark.parametrize("packing,norm_kernels,backend", [(False, False, "auto"), (True, False, "auto"),
                                                          (True, True, "auto"), (True, True, "ragged")])
def test_cuda_graphs_match_eager(cache, packing, norm_kernels, backend):
    """Graph replays (captions padded to a bucket under a mask; with caption packing, the pack a graph input; with
    the norm kernels, the layer norm + modulation in Triton; ``ragged``: the masked joint attention as cuDNN's
    variable-length kernel over [image | text]) give the eager, unpacked engine's latents."""
    torch.backends.cuda.matmul.allow_tf32 = False
    engines = [DiTEngine(DiTEngineConfig(model=ModelConfig(path="tiny:qwen-image", dtype="float32"), device="cuda",
                                         cuda_graphs=graphs, caption_packing=packing and graphs,
                                         norm_kernels=norm_kernels and graphs,
                                         attention_backend=backend if graphs else "auto"))
               for graphs in (True, False)]
    engines[0].family.pack_multiple = 4             # the tiny captions are a few tokens: pack them at that scale
    g = torch.Generator().manual_seed(0)
    dim = engines[0].family.caption_dim
    embeds = [torch.randn(n, dim, generator=g) for n in (7, 12, 9)]
    negs = [torch.randn(5, dim, generator=g), None, torch.randn(9, dim, generator=g)]
    outs = []
    for eng in engines:
        reqs = [eng.add_request(None, DiffusionParams(height=32, width=48, num_inference_steps=n, seed=i, cache=cache),
                                prompt_embeds=e, negative_prompt_embeds=ne, output_type="latent")
                for i, (n, e, ne) in enumerate(zip((6, 4, 5), embeds, negs))]
        while not all(r.is_finished for r in reqs):
            eng.step()
        outs.append([r.images[0] for r in reqs])
    graphs = engines[0].runner.graphs
    assert graphs.replays > 0 and any(io.pack is not None for io in graphs.ios.values()) == packing
    assert engines[0].family.kernels.ln_kernel.ran == norm_kernels
    for a, b in zip(*outs):
        assert _rel(a, b) < 1e-3


def test_engine_from_components_in_memory(qwen, embeds):
    """``DiTEngine.from_components``: components built in memory (as the GPU benchmark builds the real
    shape), no checkpoint directory: the same images as the engine loaded from disk."""
    eng = DiTEngine.from_components("QwenImagePipeline", {"transformer": qwen.family.transformer,
                                                          "vae": qwen.family.vae,
                                                          "scheduler": qwen.family.base_scheduler},
                                    DiTEngineConfig(model=ModelConfig(path="in-memory"), device="cpu"))
    assert eng.model_path is None
    params = DiffusionParams(height=32, width=32, num_inference_steps=2, seed=1)
    kw = _kw(embeds, "ugly", "blurry, low quality")
    a = eng.generate(None, params, output_type="latent", use_tqdm=False, **kw)[0]
    b = qwen.generate(None, params, output_type="latent", use_tqdm=False, **kw)[0]
    assert torch.equal(a, b)


def test_negative_embeds_on_a_family_without_caption_masks(sd3):
    """Negative embeds work for every family; SD3 attends to every caption token, so both CFG halves need
    equal lengths: another length is refused before any work."""
    dim = sd3.family.caption_dim
    with pytest.raises(InvalidRequestError) as err:
        sd3.make_request(None, DiffusionParams(height=32, width=32), prompt_embeds=torch.randn(12, dim),
                         negative_prompt_embeds=torch.randn(9, dim))
    assert err.value.param == "negative_prompt_embeds"
    req = sd3.make_request(None, DiffusionParams(height=32, width=32), prompt_embeds=torch.randn(12, dim),
                           negative_prompt_embeds=torch.randn(12, dim))
    assert req.do_cfg


def test_teacache_rescaling():
    """The family's published polynomial on its rising part; past it a large change never counts as small;
    other families keep the raw distance."""
    from omni_ray.dit.families import PixArtFamily, QwenImageFamily
    from omni_ray.dit.step_cache import rescale

    c = QwenImageFamily.teacache_coefficients
    assert PixArtFamily.teacache_coefficients is None and rescale(0.123, None) == 0.123
    assert rescale(0.1, c) == pytest.approx(float(np.polyval(c, 0.1)))
    assert all(rescale(d, c) >= d for d in (0.45, 0.6, 1.5)) and float(np.polyval(c, 0.6)) < 0
