"""``POST /v1/images/edits``'s form, read as OpenAI's client writes it (no Ray): what is honoured,
what is refused with a 400 naming the field, and the input image's checks under app.media."""

import asyncio
import io

import httpx
import pytest
from PIL import Image
from starlette.requests import Request

from deployments.ingress.input_image import Upload, input_image, read_form
from deployments.openai.image_edits import parse_edit_form
from omni_ray.config import MediaConfig
from omni_ray.errors import InvalidRequestError


def png(w=24, h=16, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def form_request(files: list, data: dict | None = None) -> Request:
    """A Starlette request carrying the multipart body httpx (the openai client's transport) builds."""
    built = httpx.Request("POST", "http://x/v1/images/edits", files=files, data=data or {})
    body = built.read()
    headers = [(k.lower().encode(), v.encode()) for k, v in built.headers.items()]

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/v1/images/edits", "headers": headers}, receive)


def parse(files, data=None, media=None):
    items = asyncio.run(read_form(form_request(files, data), media or MediaConfig()))
    return parse_edit_form(items)


def test_the_openai_form_is_read_with_its_extensions():
    body, upload = parse([("image", ("in.png", png(), "image/png"))],
                         {"prompt": "make it blue", "model": "tiny-qwen-image-edit", "n": "2", "size": "64x32",
                          "response_format": "b64_json", "num_inference_steps": "3", "guidance_scale": "4.0",
                          "seed": "7", "negative_prompt": " ", "cache": '{"method": "fbcache", "threshold": 0.1}'})
    assert isinstance(upload, Upload) and upload.data == png() and upload.filename == "in.png"
    assert (body.prompt, body.model, body.n) == ("make it blue", "tiny-qwen-image-edit", 2)
    assert body.diffusion() == {"height": 32, "width": 64, "num_inference_steps": 3, "guidance_scale": 4.0,
                                "seed": 7, "negative_prompt": " ", "num_images_per_prompt": 2,
                                "cache": {"method": "fbcache", "threshold": 0.1}}
    _, up = parse([("image[]", ("a.png", png(), "image/png"))], {"prompt": "x"})     # the client's list form
    assert up.data == png()


@pytest.mark.parametrize("files,data,param,match", [
    ([], {"prompt": "x"}, "image", "image is required"),
    ([("image[]", ("a.png", png(), "image/png")), ("image[]", ("b.png", png(), "image/png"))], {"prompt": "x"},
     "image", "give one image to edit"),
    ([("image", ("a.png", png(), "image/png")), ("mask", ("m.png", png(), "image/png"))], {"prompt": "x"},
     "mask", "mask is not supported"),
    ([("image", ("a.png", png(), "image/png"))], {"prompt": "x", "response_format": "url"}, "response_format",
     "'url' is not supported"),
    ([("image", ("a.png", png(), "image/png"))], {"prompt": "x", "n": "two"}, "n", "must be a number"),
    ([("image", ("a.png", png(), "image/png"))], {"prompt": "x", "input_fidelity": "high"}, "input_fidelity",
     "not supported"),
    ([("image", ("a.png", png(), "image/png"))], {"prompt": "x", "svg[model]": "m"}, "svg", "not supported"),
    ([("image", ("a.png", png(), "image/png"))], {"prompt": "x", "stream": "true"}, "stream", "not supported"),
    ([("image", ("a.png", png(), "image/png"))], {}, "prompt", "Field required"),
])
def test_refused_fields_are_named(files, data, param, match):
    with pytest.raises(InvalidRequestError, match=match) as e:
        parse(files, data)
    assert e.value.param == param and e.value.http_status == 400


def test_a_json_body_is_refused_as_not_the_form():
    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    req = Request({"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", b"application/json")]},
                  receive)
    with pytest.raises(InvalidRequestError, match="multipart/form-data") as e:
        asyncio.run(read_form(req, MediaConfig()))
    assert e.value.param == "image"


def test_the_upload_is_checked_under_app_media():
    small = MediaConfig(max_image_bytes=1024)
    with pytest.raises(InvalidRequestError, match="max_image_bytes = 1024") as e:
        parse([("image", ("a.png", png(256, 256, (1, 2, 3)) + b"\0" * 2048, "image/png"))], {"prompt": "x"}, small)
    assert e.value.param == "image"

    async def check(data, media):
        return await input_image(Upload("a", "image/png", data), media)

    with pytest.raises(InvalidRequestError, match="max_image_pixels") as e:     # from the header, before decoding
        asyncio.run(check(png(100, 100), MediaConfig(max_image_pixels=64 * 64)))
    assert e.value.param == "image"
    with pytest.raises(InvalidRequestError, match="not a decodable image") as e:
        asyncio.run(check(b"GIF89a not really", MediaConfig()))
    assert e.value.param == "image"
