"""The stage deployments: thin Serve shims over the stage engines (``omni_ray.stages``: AR over
``AsyncLLM``, DiT over ``AsyncDiTEngine``) taking typed requests, and beside them what is Serve's
business: the replica base they share (``replica``), batched calls (``batch``), pins of handed-out
objects (``pins``), the AR stage's pinned routing (``routing``) and profiling probes (``probes``)."""
