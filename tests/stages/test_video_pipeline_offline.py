"""A video pipeline offline (``OmniLLM``, the tiny Wan2.1 stage in this process): its result's
``videos`` are the frame arrays the DiT engine makes for the same request."""

import numpy as np

from omni_ray import OmniLLM
from omni_ray.dit import DiffusionParams, DiTEngine


def test_video_pipeline_offline_gives_the_engines_frames():
    cfg = {"stages": {"video": {"kind": "dit", "engine": {"model": {"path": "tiny:wan2.1-t2v"}, "device": "cpu",
                                                          "max_pixels": 65536, "max_frames": 33}}},
           "pipelines": {"video": {"graph": {"model": "video"}}}}
    with OmniLLM(cfg) as omni:
        out = omni.generate("video", "a fox running", use_tqdm=False, size="48x32", num_inference_steps=2, seed=4,
                            stage_args={"video": {"num_frames": 5}})
        assert out.images is None and len(out.videos) == 1
        assert out.stages[0]["output"] == "videos" and out.stages[0]["num_videos"] == 1
    params = DiffusionParams(height=32, width=48, num_frames=5, num_inference_steps=2, seed=4)
    ref = DiTEngine("tiny:wan2.1-t2v").generate("a fox running", params, use_tqdm=False)[0]
    video = np.asarray(out.videos[0])
    assert video.dtype == np.uint8 and video.shape == (5, 32, 48, 3) and video.std() > 1
    assert np.array_equal(video, ref)


def test_ti2v_pipeline_takes_a_first_frame_or_none():
    """Wan2.2 TI2V's graph pipeline takes an input image when given (the first frame) and makes a video from
    text alone otherwise: each equals the engine's own frames for the same request."""
    from PIL import Image

    frame = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype("uint8"))
    cfg = {"stages": {"video": {"kind": "dit", "engine": {"model": {"path": "tiny:wan2.2-ti2v"}, "device": "cpu",
                                                          "max_pixels": 65536, "max_frames": 33}}},
           "pipelines": {"video": {"graph": {"model": "video"}}}}
    params = DiffusionParams(height=64, width=96, num_frames=5, num_inference_steps=2, seed=4)
    engine = DiTEngine("tiny:wan2.2-ti2v")
    with OmniLLM(cfg) as omni:
        for image in (frame, None):
            out = omni.generate("video", "a fox running", use_tqdm=False, size="96x64", num_inference_steps=2,
                                seed=4, image=image, stage_args={"video": {"num_frames": 5}})
            kw = {} if image is None else {"image": image}
            ref = engine.generate("a fox running", params, use_tqdm=False, **kw)[0]
            assert np.array_equal(np.asarray(out.videos[0]), ref)
