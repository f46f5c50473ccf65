"""The app's OpenAPI document, made to say what the app really answers.

FastAPI documents 422 validation errors; omni-ray answers 400 with OpenAI's error body, plus 401
(API keys), 404, 429, 499 (cancelled by id), 503 and 504. Streaming routes also answer
``text/event-stream``. Each ingress replica's document also states its app's limits and pipeline
names (``apply_config``). The fuzz tests (tests/reliability) generate requests from this document
and check the responses against it.
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
    "503": "a stage is unavailable: no healthy replica (one being replaced; retry after Retry-After), engine failed",
    "504": "the request exceeded app.request_timeout_s",
}
STREAMING = ("/v1/completions", "/v1/chat/completions", "/v1/pipelines/{name}", "/generate")


def install_openapi(app, open_paths: frozenset[str]) -> None:
    """``app.openapi()`` builds the document once; with ``app.state.omni_config`` set (an
    OmniConfig: the ingress replica sets it) the document also states that app's limits and pipelines."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = _document(app, open_paths)
            cfg = getattr(app.state, "omni_config", None)
            app.openapi_schema = doc if cfg is None else apply_config(doc, cfg)
        return app.openapi_schema

    app.openapi = openapi


def apply_config(doc: dict, config) -> dict:
    """``doc`` with one app's request limits as schema bounds (``maximum``, ``maxItems``) and its
    pipeline names as the values of ``{name}``: a client (or a fuzzer) sees what is accepted. The
    ingress enforces the same limits; what a schema cannot say (pixels of a size, prompt tokens of
    a text) stays a 400 at run time."""
    lim = config.app.limits
    schemas = doc.get("components", {}).get("schemas", {})

    def alternatives(schema: str, field: str, kind: str) -> list[dict]:
        prop = schemas.get(schema, {}).get("properties", {}).get(field)
        return [] if prop is None else [a for a in prop.get("anyOf", [prop]) if a.get("type") == kind]

    def bound(schemas_: tuple[str, ...], field: str, kind: str, **bounds) -> None:
        for schema in schemas_:
            for alt in alternatives(schema, field, kind):
                alt.update(bounds)

    text = ("CompletionRequest", "ChatCompletionRequest")
    image = ("ImageGenerationRequest", "PipelineRequest")
    bound(text + ("PipelineRequest",), "max_tokens", "integer", maximum=lim.max_tokens)
    bound(("ChatCompletionRequest",), "max_completion_tokens", "integer", maximum=lim.max_tokens)
    bound(text + ("PipelineRequest",), "stop", "array", maxItems=lim.max_stop_sequences)
    bound(text, "n", "integer", maximum=lim.max_n)
    bound(image, "n", "integer", maximum=lim.max_images)
    bound(image, "num_inference_steps", "integer", maximum=lim.max_steps)
    _prompt_bounds(schemas, lim)
    if not any(p.steps and p.steps[-1].output == "audio" for p in config.pipelines.values()):
        _no_audio_out(schemas)
    for op in doc.get("paths", {}).get("/v1/pipelines/{name}", {}).values():
        for param in op.get("parameters", []):
            if param.get("name") == "name" and param.get("in") == "path":
                param["schema"]["enum"] = sorted(set(config.pipelines) | {"run"})
    return doc


def _no_audio_out(schemas: dict) -> None:
    """An app without a speech pipeline answers every chat request asking for audio out with a 400: its
    document offers ``modalities: ["text"]`` only and no ``audio`` / ``stage_args`` (speech stages' arguments)."""
    chat = schemas.get("ChatCompletionRequest", {}).get("properties", {})
    for field in ("audio", "stage_args"):
        chat.pop(field, None)
    for alt in chat.get("modalities", {}).get("anyOf", []):
        if alt.get("type") == "array":
            alt["items"] = {"type": "string", "enum": ["text"]}


def _prompt_bounds(schemas: dict, lim=None) -> None:
    """A completion's prompt (text, texts, token ids, lists of token ids) is never empty (the AR
    stage answers 400); with limits: at most ``max_prompts`` prompts of ``max_prompt_tokens`` ids."""
    prop = schemas.get("CompletionRequest", {}).get("properties", {}).get("prompt")
    for alt in [] if prop is None else prop.get("anyOf", [prop]):
        if alt.get("type") == "string":
            alt["minLength"] = 1
        if alt.get("type") != "array":
            continue
        item = alt.setdefault("items", {})
        alt["minItems"] = 1
        if item.get("type") == "integer":                   # one prompt as token ids
            if lim is not None:
                alt["maxItems"] = lim.max_prompt_tokens
            continue
        if lim is not None:                                 # several prompts
            alt["maxItems"] = lim.max_prompts
        if item.get("type") == "string":
            item["minLength"] = 1
        elif item.get("type") == "array":
            item["minItems"] = 1
            if lim is not None:
                item["maxItems"] = lim.max_prompt_tokens


def _document(app, open_paths: frozenset[str]) -> dict:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = doc.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["ErrorResponse"] = ERROR_BODY
    _prompt_bounds(schemas)
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
