"""HTTP plumbing for the ingress: exceptions -> OpenAI error bodies, server-sent events."""

from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omni_ray.errors import (
    EngineError,
    InvalidRequestError,
    OmniError,
    QueueFullError,
    RequestCancelledError,
    StageUnavailableError,
)
from omni_ray.metrics import record_http_error

log = logging.getLogger("ray.serve")

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), default=str)}\n\n"


def as_omni(err: BaseException) -> OmniError:
    """Any exception a handle call can raise, as the OmniError the client should see."""
    import ray.exceptions as rex
    from ray.serve.exceptions import BackPressureError
    from ray.serve.exceptions import RequestCancelledError as ServeCancelled

    cause = getattr(err, "cause", None) if isinstance(err, rex.RayTaskError) else None
    if isinstance(cause, BaseException):
        return as_omni(cause)
    if isinstance(err, OmniError):
        return err
    if isinstance(err, BackPressureError):
        return QueueFullError(f"stage queue is full: {err}", retry_after=1.0)
    if isinstance(err, (ServeCancelled, rex.TaskCancelledError)):
        return RequestCancelledError("request was cancelled")
    if isinstance(err, (rex.RayActorError, rex.ActorUnavailableError, rex.ObjectLostError)):
        return EngineError(f"a stage replica is unavailable: {type(err).__name__}")
    if isinstance(err, rex.RayTaskError):
        return OmniError(f"internal error: {err.__class__.__name__}")
    log.exception("unexpected error in the ingress", exc_info=err)
    return OmniError(f"internal error: {type(err).__name__}: {err}")


def error_response(err: BaseException, request_id: str | None = None) -> JSONResponse:
    record_http_error(err)                   # errors by kind (once per exception)
    e = as_omni(err)
    headers = {"X-Request-Id": request_id} if request_id else {}
    if getattr(e, "retry_after", None) is not None:      # 429 queue full, 503 stage unavailable
        headers["Retry-After"] = retry_after(e.retry_after)
    return JSONResponse(e.to_openai(), status_code=e.http_status, headers=headers)


def retry_after(seconds: float) -> str:
    return str(max(1, round(seconds)))


def health_response(down: dict[str, str | None], retry_after_s: float):
    """GET /health: 200 ``{"status": "ok"}``, or 503 naming each stage without a healthy replica
    (``stages``: {stage: why}) with an OpenAI error body and Retry-After."""
    down = {k: why for k, why in down.items() if why is not None}
    if not down:
        return {"status": "ok"}
    names = ", ".join(sorted(down))
    err = StageUnavailableError(f"no healthy replica for stage(s) {names}: " +
                                "; ".join(f"{k}: {why}" for k, why in sorted(down.items())),
                                stage=names, retry_after=retry_after_s)
    return JSONResponse({"status": "unavailable", "stages": down} | err.to_openai(), status_code=503,
                        headers={"Retry-After": retry_after(retry_after_s)})


def error_event(err: BaseException) -> str:
    """A mid-stream failure (headers already sent): one SSE event with the error body."""
    record_http_error(err)
    e = as_omni(err)
    return sse(e.to_openai() | {"status": e.http_status})


def validation_message(errs: list[dict]) -> tuple[str, str | None]:
    """(message, param) of pydantic errors: each error as ``field.path: what is wrong`` (without
    pydantic's "Value error, " prefix); param = the first error's field."""
    def loc(e: dict) -> str:
        return ".".join(str(p) for p in e.get("loc", ()) if p != "body")

    def msg(e: dict) -> str:
        m = str(e.get("msg", ""))
        return m.removeprefix("Value error, ").removeprefix("Assertion failed, ")

    text = "; ".join(f"{loc(e) or 'body'}: {msg(e)}" for e in errs)
    return text or "invalid request", (loc(errs[0]) or None) if errs else None


def install_handlers(app) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        msg, param = validation_message(exc.errors())
        return error_response(InvalidRequestError(msg, param=param))

    @app.exception_handler(OmniError)
    async def _omni(request: Request, exc: OmniError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, OmniError):      # e.g. the Gate's body limit, hit while FastAPI read the body
            return error_response(exc.__cause__)
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code)
