"""The OpenAPI document: it matches the errors and states the app's limits and pipelines."""

from __future__ import annotations

import copy

from deployments.ingress.openapi_doc import install_openapi
from tests.reliability.test_gate import gate_app
from tests.reliability.test_request_limits import limits, omni_config


# ----------------------------------------------------------------------------- the OpenAPI document
def test_openapi_document_matches_the_errors():
    app = gate_app()
    install_openapi(app, frozenset({"/health"}))
    doc = app.openapi()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert "422" not in op["responses"] and "400" in op["responses"]
            assert ("401" in op["responses"]) == (path != "/health")
            assert ("security" in op) == (path != "/health")


def test_openapi_document_states_the_apps_limits_and_pipelines():
    from deployments.ingress.ingress import app as ingress_app
    from deployments.ingress.openapi_doc import apply_config

    cfg = omni_config()
    cfg.app.limits = limits(max_n=3, max_prompts=5, max_prompt_tokens=7, max_stop_sequences=2, max_images=2)
    doc = apply_config(copy.deepcopy(ingress_app.openapi()), cfg)
    s = doc["components"]["schemas"]

    def alts(schema, field, kind):
        p = s[schema]["properties"][field]
        return [a for a in p.get("anyOf", [p]) if a.get("type") == kind]

    for schema in ("CompletionRequest", "ChatCompletionRequest", "PipelineRequest"):
        assert [a["maximum"] for a in alts(schema, "max_tokens", "integer")] == [16]
        assert [a["maxItems"] for a in alts(schema, "stop", "array")] == [2]
    assert [a["maximum"] for a in alts("ChatCompletionRequest", "max_completion_tokens", "integer")] == [16]
    assert s["CompletionRequest"]["properties"]["n"]["maximum"] == 3
    for schema in ("ImageGenerationRequest", "PipelineRequest"):
        assert s[schema]["properties"]["n"]["maximum"] == 2
        assert [a["maximum"] for a in alts(schema, "num_inference_steps", "integer")] == [4]
    prompt = sorted((a["minItems"], a["maxItems"]) for a in alts("CompletionRequest", "prompt", "array"))
    assert prompt == [(1, 5), (1, 5), (1, 7)]
    assert [a["minLength"] for a in alts("CompletionRequest", "prompt", "string")] == [1]
    (name,) = doc["paths"]["/v1/pipelines/{name}"]["post"]["parameters"]
    assert name["schema"]["enum"] == sorted([*cfg.pipelines, "run"])
    assert "maximum" not in ingress_app.openapi()["components"]["schemas"]["CompletionRequest"]["properties"]["n"]


def test_audio_out_is_documented_only_where_a_model_speaks():
    from deployments.ingress.ingress import app as ingress_app
    from deployments.ingress.openapi_doc import apply_config

    cfg = omni_config()
    speech = [n for n, p in cfg.pipelines.items() if p.steps[-1].output == "audio"]
    assert speech, "the default app has a speech pipeline"
    chat = apply_config(copy.deepcopy(ingress_app.openapi()), cfg)["components"]["schemas"]["ChatCompletionRequest"]
    assert {"audio", "stage_args"} <= set(chat["properties"])
    for name in speech:
        del cfg.pipelines[name]
    chat = apply_config(copy.deepcopy(ingress_app.openapi()), cfg)["components"]["schemas"]["ChatCompletionRequest"]
    assert not {"audio", "stage_args"} & set(chat["properties"])
    arrays = [a for a in chat["properties"]["modalities"]["anyOf"] if a.get("type") == "array"]
    assert [a["items"]["enum"] for a in arrays] == [["text"]]
