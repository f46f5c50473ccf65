"""``POST /v1/images/edits``: OpenAI's multipart form (what ``client.images.edit(...)`` sends).

Honoured: ``image`` (one file), ``prompt``, ``model``, ``n``, ``size``, ``response_format``
(``b64_json``), ``user``, and the extensions of ``/v1/images/generations`` (``num_inference_steps``,
``guidance_scale``, ``seed``, ``negative_prompt``, ``cache``; the openai client sends them with
``extra_body``). Refused with a 400 naming the field: ``mask`` (the model edits the whole image
from the prompt), several images (``image[]``), ``markup``, ``svg``, ``input_fidelity``,
``complexity``, animation frames, and what generations refuse (``response_format: url``,
``output_format`` other than png, ``quality``, ``style``, transparent ``background``, streaming).
Form values are text: numbers and booleans are read from it here, then checked by the same rules
as a JSON body.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import ValidationError

from deployments.openai.protocol import IMAGE_REFUSED, ImageGenerationRequest, _unset
from omni_ray.errors import InvalidRequestError

EDIT_REFUSED = IMAGE_REFUSED | {
    "input_fidelity": (_unset(), "input_fidelity is not supported"),
    "complexity": (_unset(), "complexity is not supported"),
    "frame_count": (_unset(), "animated images are not supported"),
    "frame_duration_ms": (_unset(), "animated images are not supported"),
}
FILE_FIELDS = {"image", "image[]", "mask", "markup"}
_INT = {"n", "num_inference_steps", "seed", "partial_images", "output_compression", "frame_count",
        "frame_duration_ms"}
_FLOAT = {"guidance_scale"}
_BOOL = {"stream"}


class ImageEditRequest(ImageGenerationRequest):
    """The form's fields other than the image file: those of a generation, with the edit's refusals."""

    refused: ClassVar[dict] = EDIT_REFUSED


def _typed(key: str, value: str) -> Any:
    """A form field's text as the JSON type the field has."""
    try:
        if key in _INT:
            return int(value)
        if key in _FLOAT:
            return float(value)
    except ValueError:
        raise InvalidRequestError(f"{key} must be a number, got {value!r}", param=key) from None
    if key in _BOOL:
        return {"true": True, "false": False}.get(value.strip().lower(), value)
    if key == "cache" and value.strip()[:1] in ("{", "n", "t", "f"):      # {"method": ...}, null, true, false
        try:
            return json.loads(value)
        except ValueError:
            return value                                  # a method name: fbcache, teacache, off
    return value


def parse_edit_form(items: list[tuple[str, Any]]) -> tuple[ImageEditRequest, Any]:
    """(the request, the one uploaded image) of a multipart form's items (name, text | a file)."""
    from deployments.ingress.http import validation_message

    files: dict[str, list] = {}
    fields: dict[str, Any] = {}
    for key, value in items:
        if not isinstance(value, str) or key in FILE_FIELDS:
            files.setdefault(key, []).append(value)
            continue
        if "[" in key:                         # svg[model], metadata[...]: nested objects OpenAI defines
            name = key.split("[")[0]
            raise InvalidRequestError(f"{name} is not supported", param=name)
        if key in fields:
            raise InvalidRequestError(f"{key} is given more than once", param=key)
        fields[key] = _typed(key, value)
    if files.get("mask"):
        raise InvalidRequestError("mask is not supported: the model edits the whole image from the prompt",
                                  param="mask")
    if files.get("markup"):
        raise InvalidRequestError("markup is not supported", param="markup")
    images = files.get("image", []) + files.get("image[]", [])
    if not images:
        raise InvalidRequestError("image is required: the image to edit, as a file of the multipart form",
                                  param="image")
    if len(images) > 1:
        raise InvalidRequestError(f"give one image to edit (got {len(images)})", param="image")
    if isinstance(images[0], str):
        raise InvalidRequestError("image must be a file of the multipart form", param="image")
    unknown = [k for k in files if k not in FILE_FIELDS]
    if unknown:
        raise InvalidRequestError(f"{unknown[0]}: unexpected file", param=unknown[0])
    try:
        body = ImageEditRequest(**fields)
    except ValidationError as err:
        msg, param = validation_message(err.errors()[:1])
        raise InvalidRequestError(msg, param=param) from None
    return body, images[0]
