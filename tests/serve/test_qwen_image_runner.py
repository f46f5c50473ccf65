"""The pipeline runner on Qwen-Image's graph (no Ray, no engines: recording backends): the text
encoder gets the pipeline's recipe, the negative prompt is encoded beside the prompt (both in
flight at once) only when the DiT step runs true CFG, and an edit's image reaches both stages."""

import asyncio
import dataclasses

import pytest
import torch
from PIL import Image

from omni_ray.config import OmniConfig, validate
from omni_ray.errors import InvalidRequestError
from omni_ray.graphs import expand_pipelines
from omni_ray.runner import StageArgs, run_pipeline
from omni_ray.stages.requests import Handoff, ImageInput
from tests.serve.conftest import app_config

CFG = expand_pipelines(validate(OmniConfig, app_config()))
KINDS = {k: s.kind for k, s in CFG.stages.items()}


class RecordingAR:
    def __init__(self):
        self.reqs, self.in_flight, self.most_in_flight = [], 0, 0

    async def encode(self, req) -> Handoff:
        self.reqs.append(req)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        for _ in range(3):                     # let a concurrent call start
            await asyncio.sleep(0)
        self.in_flight -= 1
        t = len(req.prompt)
        return Handoff(shape=[t, 4], tensor=torch.full((t, 4), float(t)), object_id=f"obj-{req.request_id}")


class RecordingDiT:
    def __init__(self):
        self.reqs = []

    async def generate(self, req):
        self.reqs.append(req)
        yield {"kind": "progress", "step": 1, "total": 1}
        yield {"kind": "done", "images": ["png"], "info": {}}


def run(name, prompt="a red fox", image=None, **kw):
    pipe = CFG.pipelines[name]
    ar, dit = RecordingAR(), RecordingDiT()
    backends = {pipe.steps[0].stage: ar, pipe.steps[1].stage: dit}
    args = StageArgs.from_kwargs(kw)
    args.validate(name, pipe, KINDS)

    async def go():
        return [ev async for ev in run_pipeline(pipe, backends, KINDS, prompt, "r1", args, image)]

    return asyncio.run(go()), ar, dit


def test_the_negative_prompt_is_encoded_beside_the_prompt_under_true_cfg():
    events, ar, dit = run("qwen-image", negative_prompt="blurry", guidance_scale=4.0, num_inference_steps=2)
    assert sorted(r.prompt for r in ar.reqs) == ["a red fox", "blurry"] and ar.most_in_flight == 2
    assert all(r.encoding is not None and r.encoding.drop_tokens == 34 for r in ar.reqs)   # QwenImagePipeline's
    (req,) = dit.reqs
    assert req.conditioning.object_id == "obj-r1-0" and req.negative_conditioning.object_id == "obj-r1-0-neg"
    end = next(e for e in events if e["type"] == "stage_end" and e["step"] == 0)
    assert end["shape"] == [9, 4] and end["negative"] == {"shape": [6, 4], "object_id": "obj-r1-0-neg"}
    assert events[-1]["usage"]["prompt_tokens"] == 9 + 6


@pytest.mark.parametrize("kw", [{}, {"guidance_scale": 4.0}, {"negative_prompt": "blurry", "guidance_scale": 1.0}])
def test_no_negative_encode_without_true_cfg(kw):
    _, ar, dit = run("qwen-image", **kw)
    assert [r.prompt for r in ar.reqs] == ["a red fox"] and dit.reqs[0].negative_conditioning is None


def test_an_edit_image_reaches_both_stages_and_both_encodes():
    img = ImageInput.of(Image.new("RGB", (32, 24), (10, 200, 30)))
    _, ar, dit = run("qwen-image-edit", image=img, negative_prompt=" ", guidance_scale=4.0)
    assert len(ar.reqs) == 2 and all(r.multi_modal_data == {"image": img} for r in ar.reqs)
    assert all(r.encoding.image for r in ar.reqs)                  # QwenImageEditPipeline's recipe takes it
    assert dit.reqs[0].image is img and dit.reqs[0].negative_conditioning is not None
    other = ImageInput.of(Image.new("RGB", (32, 24), (10, 200, 31)))
    assert other.digest != img.digest and ImageInput.of(img.image).digest == img.digest
    # hidden-state cache keys (and the hand-off's source) see the image by content
    again = dataclasses.replace(ar.reqs[0], multi_modal_data={"image": ImageInput.of(img.image.copy())})
    assert again.input_digest() == ar.reqs[0].input_digest()
    assert dataclasses.replace(ar.reqs[0], multi_modal_data={"image": other}).input_digest() != again.input_digest()


def test_image_required_by_edit_and_refused_elsewhere():
    img = ImageInput.of(Image.new("RGB", (8, 8)))
    with pytest.raises(InvalidRequestError, match="give the input image") as e:
        run("qwen-image-edit")
    assert e.value.param == "image"
    with pytest.raises(InvalidRequestError, match="takes no input image") as e:
        run("qwen-image", image=img)
    assert e.value.param == "image"


def test_an_empty_negative_prompt_is_a_400_naming_it():
    with pytest.raises(InvalidRequestError, match="negative_prompt is empty") as e:
        run("qwen-image", negative_prompt="", guidance_scale=4.0)
    assert e.value.param == "negative_prompt"
