"""Server-Timing: where an HTTP request's time went, in a standard response header.

    Server-Timing: admit;dur=1.42, work;dur=41.80, engine;dur=38.95, total;dur=44.10

The Gate starts one ``ServerTiming`` per HTTP request (a context variable, so the route and the
tasks it spawns see it) and writes the header when the response starts. Parts (milliseconds):

* ``admit``: waiting for the omni scheduler's grant;
* ``work``: the stage calls of a non-streaming request, as the ingress sees them;
* ``engine``: inside the stage replica (the AR replica's own account of ``complete``; the
  slowest choice when ``n`` > 1): ``work - engine`` is the ingress -> replica round trip;
* ``first_event``: a stream's stage calls up to its first output (headers go then);
* ``total``: from the Gate to the response's first bytes; the client's time minus ``total`` is
  the proxy and the network.

Browsers' developer tools show the header; ``benchmarks/bench_serve.py`` splits latency with it.
"""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager

_CURRENT: contextvars.ContextVar["ServerTiming | None"] = contextvars.ContextVar("omni_server_timing", default=None)


class ServerTiming:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.parts: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds

    def longest(self, name: str, seconds: float) -> None:
        """Keep the largest value seen for ``name`` (parallel parts, e.g. the choices of n > 1)."""
        self.parts[name] = max(self.parts.get(name, 0.0), seconds)

    def header(self) -> bytes:
        parts = dict(self.parts, total=time.perf_counter() - self.t0)
        return ", ".join(f"{k};dur={1000 * v:.2f}" for k, v in parts.items()).encode()


def start() -> ServerTiming:
    timing = ServerTiming()
    _CURRENT.set(timing)
    return timing


def current() -> ServerTiming | None:
    return _CURRENT.get()


@contextmanager
def part(name: str):
    """Time the block as ``name`` of the current request (nothing outside an HTTP request)."""
    timing = _CURRENT.get()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if timing is not None:
            timing.add(name, time.perf_counter() - t0)


def parse(header: str) -> dict[str, float]:
    """'a;dur=1.5, b;dur=2' -> {"a": 1.5, "b": 2.0} (milliseconds)."""
    out = {}
    for item in filter(None, (x.strip() for x in header.split(","))):
        name, _, params = item.partition(";")
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "dur":
                out[name.strip()] = float(v)
    return out
