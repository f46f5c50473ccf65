"""Where HTTP clients reach a running omni app.

By default every request goes through Ray Serve's HTTP proxy (``http_options.port``, 8000),
which forwards it to an ingress replica: one extra process hop each way. With Serve's
throughput-optimized mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the environment of every Ray
node, set before the cluster starts) each ingress replica also serves HTTP on its own port
("direct ingress", 30000 and up on its node), which a load balancer (or a client) can call
without the proxy; the proxy keeps working. ``direct_ingress_urls`` lists those ports as Serve's
controller reports them (its load-balancer target groups).

    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 serve run serve_config.gpu.yaml
    python -c "import ray; ray.init()
    from deployments.ingress.endpoints import direct_ingress_urls; print(direct_ingress_urls('omni'))"
"""

from __future__ import annotations

import time


def direct_ingress_urls(app_name: str, timeout_s: float = 5.0, expect: int = 1) -> list[str]:
    """``http://ip:port`` of each ingress replica serving ``app_name`` directly; empty when Serve
    runs without direct ingress (every request then goes through the proxy). Waits up to
    ``timeout_s`` for ``expect`` replicas' servers to be registered."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.monotonic() + timeout_s
    while True:
        groups = ray.get(controller.get_target_groups.remote(app_name))
        urls = [f"http://{t.ip}:{t.port}" for g in groups
                if g.protocol == "HTTP" and getattr(g, "ingress_deployment_name", "") for t in g.targets]
        if len(urls) >= expect or time.monotonic() > deadline:
            return urls
        time.sleep(0.5)
