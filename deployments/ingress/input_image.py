"""A request's input image (image edit) at the ingress: checked once, put once in the object store.

    items = await read_form(request, app.media)          # a multipart form, files read within their budget
    image = await input_image(upload | bytes | data URL | base64 | PIL, app.media)   -> ImageInput(ref=...)

The bytes go through ``omni_ray.media`` (byte budget, formats, pixel count from the header before
decoding, a full decode: a corrupt file is a 400 here, naming ``image``, before any stage runs).

Transport: the encoded bytes are ``ray.put`` once here and both stages get the ref (the AR text
encoder's vision tower, the DiT's VAE), each resolving it in its own replica. Not by value: an
upload may be up to ``app.media.max_image_bytes`` (20 MB by default) and would be serialized into
each stage call (twice per request, and again by the AR stage's own object-store promotion of large
arguments); not the decoded pixels: RGB is several times the encoded size. Each replica decodes the
same checked bytes again (milliseconds beside a denoising run). The ingress owns the object for the
request's lifetime, as it owns the request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from omni_ray.config import MediaConfig
from omni_ray.errors import InvalidRequestError, OmniError
from omni_ray.media.images import decode_image, load_image
from omni_ray.media.sources import read_source
from omni_ray.stages.requests import ImageInput


def _check(source, media: MediaConfig, param: str) -> tuple[bytes, object]:
    """(encoded bytes, decoded RGB image) of ``source`` under ``media``'s limits."""
    if hasattr(source, "convert"):                        # a PIL image (Python handle callers)
        import io

        img = load_image(source, param, media)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), img
    data, mime = read_source(source, param, media, media.max_image_bytes)
    if mime and not mime.startswith("image/"):
        raise InvalidRequestError(f"{param}: expected an image, the data URL says {mime!r}", param=param)
    return data, decode_image(data, param, media)


async def input_image(source, media: MediaConfig, param: str = "image") -> ImageInput:
    """Check ``source`` (decoding runs off the event loop) and put its bytes in the object store."""
    import ray

    if isinstance(source, Upload):
        source = source.data
    if source is None or (isinstance(source, (str, bytes)) and not source):
        raise InvalidRequestError(f"{param} is empty", param=param)
    data, img = await asyncio.get_running_loop().run_in_executor(None, _check, source, media, param)
    return ImageInput.of(img, ref=ray.put(data), keep=False)


@dataclass
class Upload:
    """A file of a multipart form, read (within its byte budget) before the form is closed."""

    filename: str | None
    content_type: str | None
    data: bytes


async def read_form(request, media: MediaConfig, param: str = "image") -> list[tuple[str, Any]]:
    """The (name, value) items of a multipart form, files as ``Upload``s of at most
    ``app.media.max_image_bytes`` each (the whole body is within ``app.limits.max_body_bytes``, the
    Gate's check)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise InvalidRequestError("this route takes OpenAI's multipart/form-data form (an image file, prompt, ...), "
                                  f"not {ctype.split(';')[0] or 'an unnamed content type'}", param=param)
    try:
        form = await request.form(max_files=8, max_fields=64)
    except OmniError:
        raise
    except Exception as err:   # noqa: BLE001 - python-multipart / Starlette raise several types for bad forms
        cause = err.__cause__ if isinstance(err.__cause__, OmniError) else None
        if cause is not None:                    # the Gate's body limit, hit while the form was read
            raise cause from None
        raise InvalidRequestError(f"not a readable multipart form: {getattr(err, 'detail', None) or err}",
                                  param=param) from None
    try:
        items = []
        for key, value in form.multi_items():
            if isinstance(value, str):
                items.append((key, value))
                continue
            if value.size is not None and value.size > media.max_image_bytes:
                name = key.removesuffix("[]")
                raise InvalidRequestError(f"{name}: the file is {value.size} bytes; the limit is "
                                          f"app.media.max_image_bytes = {media.max_image_bytes}", param=name)
            items.append((key, Upload(value.filename, value.content_type, await value.read())))
        return items
    finally:
        await form.close()


# the form in the OpenAPI document (the route reads the form itself, so FastAPI cannot infer it)
EDIT_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {"image": {"type": "string", "format": "binary", "description": "the image to edit (one file)"},
                   "prompt": {"type": "string", "minLength": 1}, "model": {"type": "string"},
                   "n": {"type": "integer", "minimum": 1}, "size": {"type": "string", "description": "WxH"},
                   "response_format": {"type": "string", "enum": ["b64_json"]},
                   "num_inference_steps": {"type": "integer", "minimum": 1},
                   "guidance_scale": {"type": "number", "minimum": 0}, "seed": {"type": "integer", "minimum": 0},
                   "negative_prompt": {"type": "string"}}}}}}}
