"""The ingress's front door: an ASGI middleware that runs before FastAPI reads or parses a body.

    app.add_middleware(Gate)                  # deployments/ingress/ingress.py, at import
    app.state.gate = GateSettings.from_app(cfg.app)   # Ingress.__serve_build_asgi_app__, per replica

For every HTTP request, in this order:
  1. API keys (``app.api_keys`` / ``OMNI_RAY_API_KEYS``): ``Authorization: Bearer <key>`` compared
     in constant time against every key; 401 (with ``WWW-Authenticate``) otherwise. Only
     ``/health`` is open. Unauthenticated requests never reach body parsing.
  2. Body size (``app.limits.max_body_bytes``): a ``Content-Length`` over the limit is refused at
     once; a chunked body is counted as it arrives and refused as soon as it passes the limit.
  3. Anything the route raised that no handler turned into a response becomes an OpenAI error
     body (a dead replica: 503), never a bare 500 page.
  4. A ``Server-Timing`` header on every response (deployments/ingress/timing.py); the request's
     X-Request-Id as it came in, for the route's id (deployments/ingress/request_ids.py).

Settings come from the replica (the config tree); a Gate without them answers 503 (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from deployments.ingress import request_ids
from deployments.ingress.timing import start as timing_start
from omni_ray.config import AppConfig
from omni_ray.errors import AuthenticationError, InvalidRequestError, OmniError, ResourceError

OPEN_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class GateSettings:
    key_digests: tuple[bytes, ...]        # sha256 of each key: equal-length, constant-time compares
    max_body_bytes: int

    @classmethod
    def from_app(cls, app: AppConfig) -> "GateSettings":
        keys = tuple(_digest(k.encode("utf-8")) for k in app.resolved_api_keys())
        return cls(key_digests=keys, max_body_bytes=app.limits.max_body_bytes)

    def authorized(self, header: bytes | None) -> bool:
        """Every configured key is compared (no early exit), each compare constant-time."""
        if not self.key_digests:
            return True
        scheme, _, token = (header or b"").partition(b" ")
        presented = _digest(token.strip())
        ok = False
        for key in self.key_digests:
            ok |= hmac.compare_digest(presented, key)
        return ok and scheme.lower() == b"bearer" and bool(token.strip())


def _digest(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


class BodyTooLarge(InvalidRequestError):
    pass


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v
    return None


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


async def send_error(send, err: OmniError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(err.to_openai()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": err.http_status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Gate:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings: GateSettings | None = getattr(scope["app"].state, "gate", None) if "app" in scope else None
        if _route_path(scope) in OPEN_PATHS:
            return await self._run(scope, receive, send)
        if settings is None:
            return await send_error(send, ResourceError("the ingress is not configured yet"))
        if not settings.authorized(_header(scope, b"authorization")):
            return await send_error(send, AuthenticationError(
                "invalid or missing API key (Authorization: Bearer <key>)"), {"WWW-Authenticate": "Bearer"})
        limit = settings.max_body_bytes
        size = _header(scope, b"content-length")
        if size is not None and (not size.strip().isdigit() or int(size) > limit):
            return await send_error(send, BodyTooLarge(f"request body is larger than {limit} bytes", param="body")
                                    if size.strip().isdigit() else InvalidRequestError("bad Content-Length"))
        return await self._run(scope, _limited(receive, limit), send)

    async def _run(self, scope, receive, send):
        started = False
        timing = timing_start()
        ids = request_ids.begin(scope)

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [*message.get("headers", ()), (b"server-timing", timing.header())]
                rid = ids.header()
                if rid is not None and not any(k.lower() == rid[0] for k, _ in headers):
                    headers.append(rid)
                message = dict(message, headers=headers)
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as err:  # noqa: BLE001 - the last line of defence: an error body, not a 500 page
            if started:
                raise
            from deployments.ingress.http import as_omni
            rid = ids.header()
            await send_error(send, as_omni(err), {"X-Request-Id": rid[1].decode()} if rid else None)


def _limited(receive, limit: int):
    """``receive`` that raises BodyTooLarge once more than ``limit`` body bytes have arrived."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(f"request body is larger than {limit} bytes", param="body")
        return message

    return wrapped
