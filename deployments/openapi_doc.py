"""The app's OpenAPI document, made to say what the app really answers.

FastAPI documents 422 validation errors; omni-ray answers 400 with OpenAI's error body, plus 401
(API keys), 404, 429, 499 (cancelled by id), 503 and 504. Streaming routes also answer
``text/event-stream``. The fuzz tests (tests/reliability) check responses against this document.
"""

from __future__ import annotations

from fastapi.openapi.utils import get_openapi

ERROR_BODY = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
ERRORS = {
    "400": "invalid request (bad field, a limit exceeded, body too large)",
    "401": "missing or wrong API key (Authorization: Bearer <key>)",
    "404": "unknown model, pipeline or path",
    "429": "queue full; retry after Retry-After seconds",
    "499": "cancelled through POST /v1/requests/{id}/cancel",
    "503": "a stage is unavailable (replica restarting, engine failed)",
    "504": "the request exceeded app.request_timeout_s",
}
STREAMING = ("/v1/completions", "/v1/chat/completions", "/v1/pipelines/{name}")


def install_openapi(app, open_paths: frozenset[str]) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, open_paths)
        return app.openapi_schema

    app.openapi = openapi


def _document(app, open_paths: frozenset[str]) -> dict:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = doc.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["ErrorResponse"] = ERROR_BODY
    comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for code, what in ERRORS.items():
                if code == "401" and path in open_paths:
                    continue
                responses[code] = {"description": what, "content": error}
            if path not in open_paths:
                op["security"] = [{"bearer": []}]
            if path in STREAMING and "200" in responses:
                responses["200"].setdefault("content", {})["text/event-stream"] = {}   # SSE: "data: <json>" events
    return doc
