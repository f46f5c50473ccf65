"""Request ids without Ray: ``<prefix>-<X-Request-Id>``, unique, the header written only when Serve's
proxy did not bring one (it writes the incoming one on every response)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from deployments.ingress.gate import Gate, GateSettings
from deployments.ingress.http import install_handlers
from deployments.ingress.request_ids import RequestIds
from omni_ray.config import AppConfig
from omni_ray.errors import InvalidRequestError


def ids_app(ids: RequestIds) -> FastAPI:
    app = FastAPI()
    install_handlers(app)
    app.add_middleware(Gate)
    app.state.gate = GateSettings.from_app(AppConfig())

    @app.post("/v1/chat/completions")
    async def chat():
        return {"id": ids.new("chatcmpl")}

    @app.post("/fails")
    async def fails():
        ids.new("cmpl")
        raise InvalidRequestError("bad", param="x")

    return app


def post(app, path, headers=None) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(path, headers=headers or {})
    return asyncio.run(go())


def test_the_id_is_the_prefix_and_the_incoming_x_request_id():
    app = ids_app(RequestIds())
    r = post(app, "/v1/chat/completions", {"X-Request-Id": "4f1c2a9e-0b7d-4d2e-9a55-2c6f0e8b1d3a"})
    assert r.json()["id"] == "chatcmpl-4f1c2a9e-0b7d-4d2e-9a55-2c6f0e8b1d3a"
    assert "x-request-id" not in r.headers          # Serve's proxy writes the incoming one


def test_without_an_incoming_header_the_id_is_made_here_and_sent():
    app = ids_app(RequestIds())
    r = post(app, "/v1/chat/completions")
    rid = r.json()["id"]
    assert rid.startswith("chatcmpl-") and rid == "chatcmpl-" + r.headers["x-request-id"]
    err = post(app, "/fails")
    assert err.status_code == 400 and err.headers["x-request-id"]       # errors too, once the id exists


def test_a_repeated_x_request_id_still_gives_a_unique_id():
    app = ids_app(RequestIds(remember=4))
    first = post(app, "/v1/chat/completions", {"X-Request-Id": "trace-42"}).json()["id"]
    again = post(app, "/v1/chat/completions", {"X-Request-Id": "trace-42"}).json()["id"]
    assert first == "chatcmpl-trace-42"
    assert again.startswith("chatcmpl-trace-42-") and len(again) == len(first) + 9


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "semi;colon", "ü"])
def test_a_malformed_x_request_id_is_400_naming_the_header(bad):
    r = post(ids_app(RequestIds()), "/v1/chat/completions", {"X-Request-Id": bad.encode("utf-8")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"


def test_outside_http_ids_are_made_here():
    ids = RequestIds()
    a, b = ids.new("handle"), ids.new("handle")
    assert a != b and a.startswith("handle-")
