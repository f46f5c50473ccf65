"""omni-ray's Ray Serve application: one deployment per stage plus an OpenAI-compatible ingress.

    app.py            build_app(args) -> Application (from an OmniConfig);  options.py: Serve options
    stages/           the stage deployments: ar.py / dit.py over AsyncLLM / AsyncDiTEngine (named by
                      stage key), replica.py (their shared base), pins.py and routing.py (pinned aborts)
    ingress/          the Ingress deployment (ingress.py: HTTP routes and typed Python methods, one class)
                      and the modules it calls: lifecycle.py (deadline, admission, release), catalog.py,
                      text.py / pipelines.py (runs), remote_stages.py (stage calls through handles),
                      admission.py (the omni scheduler's tickets), gate.py, http.py, openapi_doc.py, ...
    openai/           protocol.py: OpenAI request bodies;  responses.py: response bodies and chunks
    services.py       what replicas tell the cluster services: capacity reports, the DiT cache client
    streams.py        merge / cancel helpers shared by the ingress and the stages
"""
