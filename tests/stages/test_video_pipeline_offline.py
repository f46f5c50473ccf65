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
