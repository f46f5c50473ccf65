"""The video API's body (no Ray): seconds -> the model's 4k + 1 frames, the first frame's two names,
and the 400s that name their field."""

import pytest

from deployments.openai.videos import VideoGenerationRequest
from omni_ray.errors import InvalidRequestError


@pytest.mark.parametrize("seconds, fps, frames", [("5", 16, 81), (2, 16, 33), (0.5, 8, 5), ("0.01", 16, 1),
                                                  (1.1, 16, 17)])
def test_seconds_become_the_nearest_4k_plus_1_frames(seconds, fps, frames):
    body = VideoGenerationRequest(prompt="a fox", seconds=seconds, fps=fps)
    assert body.frames(body.frame_rate(16), 4) == frames


def test_num_frames_and_defaults():
    assert VideoGenerationRequest(prompt="a", num_frames=9).frames(16, 4) == 9
    body = VideoGenerationRequest(prompt="a")
    assert body.frames(body.frame_rate(24), 4) is None and body.frame_rate(24) == 24
    assert body.first_frame() == ("input_reference", None)
    assert VideoGenerationRequest(prompt="a", image="data:,x").first_frame() == ("image", "data:,x")


@pytest.mark.parametrize("kw, param", [
    (dict(seconds=1, num_frames=5), "seconds"), (dict(seconds="soon"), "seconds"), (dict(seconds=-1), "seconds"),
    (dict(fps=0), "fps"), (dict(fps=500), "fps"),
    (dict(image="a", input_reference="b"), "image"),
])
def test_bad_fields_name_themselves(kw, param):
    body = VideoGenerationRequest(prompt="a fox", **kw)
    with pytest.raises(InvalidRequestError) as e:
        body.first_frame()
        body.frames(body.frame_rate(16), 4)
    assert e.value.param == param


def test_the_catalog_tells_an_optional_first_frame_from_a_required_one():
    """/v1/videos asks for input_reference only where the checkpoint requires an image (Wan2.1 I2V), not where
    it only takes one (Wan2.2 TI2V: text alone, or an image's first frame)."""
    from deployments.ingress.catalog import Catalog
    from omni_ray.config import OmniConfig

    cfg = OmniConfig.model_validate({"stages": {
        k: {"kind": "dit", "engine": {"model": {"path": f"tiny:{m}"}}}
        for k, m in (("t2v", "wan2.1-t2v"), ("i2v", "wan2.1-i2v"), ("ti2v", "wan2.2-ti2v"))}})
    cat = Catalog(cfg)
    assert [("image" in cat.modalities(k)["input"], "image" in cat.requires(k)) for k in ("t2v", "i2v", "ti2v")] \
        == [(False, False), (True, True), (True, False)]
