"""omni-ray's Ray Serve application: one deployment per stage plus an OpenAI-compatible ingress.

    app.py            build_app(args) -> Application (from an OmniConfig)
    ar.py / dit.py    stage deployments over AsyncLLM / AsyncDiTEngine (named by stage key)
    ingress.py        FastAPI routes;  ingress_core.py: admission, lifecycle, text and pipeline runs
    handle_api.py     typed Python methods for other Ray apps (serve.get_app_handle)
    pipeline.py       stage calls through handles for omni_ray.pipeline.run_pipeline
    protocol.py       OpenAI request bodies;  openai_format.py: response bodies and chunks
    admission.py      the omni scheduler's tickets;  services.py: capacity reports, DiT cache
    streams.py        merge / cancel helpers;  http.py: errors -> OpenAI bodies, SSE;  options.py
"""
