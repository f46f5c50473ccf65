"""Arguments of the ingress's typed Python methods (``serve.get_app_handle("omni")``): validated by the
same request models as the HTTP API, so errors arrive as the same typed exceptions."""

import io

from pydantic import ValidationError

from deployments.ingress.http import validation_message
from deployments.openai.protocol import ChatCompletionRequest, CompletionRequest
from omni_ray.errors import InvalidRequestError


def validated(cls, **kw):
    """Build a protocol model from Python-handle kwargs; pydantic errors become InvalidRequestError."""
    try:
        return cls(**kw)
    except ValidationError as err:
        msg, param = validation_message(err.errors()[:1])
        raise InvalidRequestError(msg, param=param) from None


def images_as(pngs: list[bytes], fmt: str) -> list:
    """PNG bytes as asked: ``png`` (as they are) or ``pil`` (PIL images)."""
    if fmt == "png":
        return list(pngs)
    if fmt == "pil":
        from PIL import Image
        return [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
    raise InvalidRequestError(f"output_format must be 'png' or 'pil', got {fmt!r}", param="output_format")


def text_body(prompt, messages, logprobs: int | bool | None = None, **kw):
    """The request model and the prompts' inputs of a text call: exactly one of ``prompt`` and
    ``messages`` (only the first prompt of a list is used). ``logprobs``: None (off), or how many
    alternatives besides each token (vLLM's meaning; True is 0, False None)."""
    if (prompt is None) == (messages is None):
        raise InvalidRequestError("give exactly one of prompt and messages", param="prompt")
    if isinstance(logprobs, bool):
        logprobs = 0 if logprobs else None
    if messages is not None:
        body = validated(ChatCompletionRequest, messages=messages, logprobs=logprobs is not None,
                         top_logprobs=logprobs, **kw)
        return body, [{"messages": body.chat_messages()}]
    body = validated(CompletionRequest, prompt=prompt, logprobs=logprobs, **kw)
    return body, [{"prompt": p} for p in body.prompts()[:1]]
