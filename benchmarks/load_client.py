"""The benchmarks' HTTP client: light enough that the load it makes is the server's to carry.

    async with Clients(urls, n, kind="aiohttp") as cs:
        tokens, first, chunks = await cs.stream(i, "/v1/completions", body)   # client i's URL: urls[i % len]
        status, headers, body = await cs.post(i, "/v1/completions", body)

``aiohttp`` is the default (vLLM's ``benchmark_serving`` uses it too). ``httpx`` stays for
comparison: its asyncio client costs about a millisecond of this process's time per request, so
a burst of 64 streams left it over 50-60 ms (up to 440 ms on a 2-core box with the server beside
it) where aiohttp sends them in ~8 ms (``python benchmarks/load_client.py``).
"""

from __future__ import annotations

import asyncio
import json
import time


class Clients:
    """Keep-alive connections to one or more base URLs (direct ingress: one per ingress replica);
    client ``i`` uses ``urls[i % len(urls)]``, as a load balancer would spread them."""

    def __init__(self, urls: list[str] | str, n: int, kind: str = "aiohttp", timeout_s: float = 900):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.n, self.kind, self.timeout_s = n, kind, timeout_s
        self._sessions: list = []

    async def __aenter__(self) -> "Clients":
        if self.kind == "aiohttp":
            import aiohttp
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            self._sessions = [aiohttp.ClientSession(u, timeout=timeout,
                                                    connector=aiohttp.TCPConnector(limit=self.n + 8))
                              for u in self.urls]
        elif self.kind == "httpx":
            import httpx
            limits = httpx.Limits(max_connections=self.n + 8, max_keepalive_connections=self.n + 8)
            self._sessions = [httpx.AsyncClient(base_url=u, timeout=self.timeout_s, limits=limits) for u in self.urls]
        else:
            raise ValueError(f"unknown client kind {self.kind!r} (aiohttp | httpx)")
        return self

    async def __aexit__(self, *exc) -> None:
        for s in self._sessions:
            await (s.close() if self.kind == "aiohttp" else s.aclose())

    def _session(self, i: int):
        return self._sessions[i % len(self._sessions)]

    async def post(self, i: int, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of one request (GET when ``body`` is None)."""
        s = self._session(i)
        if self.kind == "aiohttp":
            method = s.post(path, json=body) if body is not None else s.get(path)
            async with method as r:
                return r.status, dict(r.headers), await r.json()
        r = await (s.post(path, json=body) if body is not None else s.get(path))
        return r.status_code, dict(r.headers), r.json()

    async def stream(self, i: int, path: str, body: dict) -> tuple[int, float | None, int]:
        """One server-sent-events completion: (completion tokens from the final usage event, time
        of the first chunk with a choice, chunks read). Light: bytes kept, only the usage parsed."""
        first, chunks = None, []
        s = self._session(i)
        if self.kind == "aiohttp":
            async with s.post(path, json=body) as r:
                r.raise_for_status()
                async for chunk in r.content.iter_any():
                    if first is None and b'"choices":[{' in chunk:
                        first = time.perf_counter()
                    chunks.append(chunk)
        else:
            async with s.stream("POST", path, json=body) as r:
                r.raise_for_status()
                async for chunk in r.aiter_bytes():
                    if first is None and b'"choices":[{' in chunk:
                        first = time.perf_counter()
                    chunks.append(chunk)
        return usage_tokens(b"".join(chunks)), first, len(chunks)


def usage_tokens(sse: bytes) -> int:
    """``completion_tokens`` of the last usage event of a server-sent-events body."""
    events = sse.decode().split("\n\n")
    usage = next(json.loads(e[6:]) for e in reversed(events) if e.startswith("data: {") and '"usage":{' in e)
    return usage["usage"]["completion_tokens"]


# ----------------------------------------------------------------------------- the client's own cost
async def _self_test(n: int = 64, chunks: int = 13) -> None:
    """Each client kind against a trivial SSE server in this process: how long a burst of ``n``
    streams takes to reach the server (what the client itself costs)."""
    from aiohttp import web

    arrivals: list[float] = []

    async def handler(request):
        arrivals.append(time.perf_counter())
        await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(chunks):
            await resp.write(b'data: {"choices":[{"text":"x"}]}\n\n')
            await asyncio.sleep(0.02)
        await resp.write(b'data: {"choices":[],"usage":{"completion_tokens":1}}\n\ndata: [DONE]\n\n')
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    body = {"model": "m", "prompt": "hello", "max_tokens": 1, "stream": True}
    try:
        for kind in ("httpx", "aiohttp"):
            async with Clients(url, n, kind) as cs:
                for burst in range(3):
                    arrivals.clear()
                    t0 = time.perf_counter()
                    await asyncio.gather(*(cs.stream(i, "/v1/completions", body) for i in range(n)))
                    print(f"{kind:8s} burst {burst}: {n} requests reached the server over "
                          f"{1000 * (max(arrivals) - t0):.1f} ms (first after {1000 * (min(arrivals) - t0):.1f} ms)")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(_self_test())
