"""The ingress's speech backends without Ray (``RemoteTalker`` / ``RemoteToken2Wav``): a stream's first item
names its replica and is not passed on; feeds wait for it, go to that replica (``replica=``) in the order they
were made, and are dropped once the stream ended; a consumer that stops early cancels the stream's call.
The fake handle stands where Serve routes calls; its replicas record what reaches them."""

import asyncio

from deployments.ingress.remote_stages import RemoteTalker, RemoteToken2Wav, remote_backends
from deployments.ingress.stage_health import StageHealth


class Call:
    """A streaming call: the replica's generator, iterated in the caller's task; ``cancel`` as Serve's."""

    def __init__(self, agen):
        self.agen, self.cancelled = agen, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    def cancel(self):
        self.cancelled = True


class Replica:
    """A speech replica: streams ``{"replica": id}`` then whatever ``items`` gets; records feeds."""

    def __init__(self, name: str):
        self.name, self.fed, self.started = name, [], asyncio.Event()
        self.items: asyncio.Queue = asyncio.Queue()

    async def generate(self, req):
        yield {"replica": self.name}
        self.started.set()
        while (item := await self.items.get()) is not None:
            yield item

    async def feed(self, request_id, *args, replica=None):
        await asyncio.sleep(0.001 * (len(self.fed) % 3))      # calls that overtake each other, were they concurrent
        self.fed.append((request_id, args, replica))


class Method:
    def __init__(self, handle, name, stream):
        self.handle, self.name, self.stream = handle, name, stream

    def remote(self, *args, **kw):
        replica = self.handle.route(kw.get("replica"))
        self.handle.calls.append((self.name, kw.get("replica")))
        out = getattr(replica, self.name)(*args, **kw)
        if self.stream:
            call = Call(out)
            self.handle.streams.append(call)
            return call
        return asyncio.ensure_future(out)


class Handle:
    """Routes a call with ``replica=`` to that replica (the PinnedRouter), others round robin."""

    def __init__(self, replicas, stream=None, shared=None):
        self.replicas, self.stream = replicas, stream
        self.calls, self.streams, self.next = ([], [], [0]) if shared is None else shared

    def options(self, stream=False):
        return Handle(self.replicas, stream, (self.calls, self.streams, self.next))

    def route(self, replica):
        if replica is not None:
            return next(r for r in self.replicas if r.name == replica)
        self.next[0] += 1
        return self.replicas[self.next[0] % len(self.replicas)]

    def broadcast(self, method):                    # the ingress's health probes: every replica answers
        replicas = self.replicas

        class Answers:
            async def results_async(self, timeout_s=None, return_exceptions=False):
                return [{"status": "ok"} for _ in replicas]
        return Answers()

    def __getattr__(self, name):
        return Method(self, name, self.stream)


class Req:
    def __init__(self, request_id):
        self.request_id = request_id


def backend(cls, n=3):
    replicas = [Replica(f"r{i}") for i in range(n)]
    handle = Handle(replicas)
    return cls(handle, "omni-talker", StageHealth({"omni-talker": handle})), handle, replicas


def test_feeds_follow_the_stream_in_order_and_the_replica_line_is_not_passed_on():
    async def go():
        remote, handle, replicas = backend(RemoteTalker)
        items = []

        async def consume():
            async for d in remote.generate(Req("a")):
                items.append(d)

        feeds = [asyncio.ensure_future(remote.feed("a", f"rows{i}")) for i in range(3)]  # before the stream starts
        task = asyncio.ensure_future(consume())
        running = next(r for r in replicas if r.name == "r1")          # round robin picks r1 first
        await running.started.wait()
        feeds += [asyncio.ensure_future(remote.feed("a", f"rows{i}")) for i in range(3, 6)]
        await asyncio.gather(*feeds)
        running.items.put_nowait({"codes": [5, 6], "finished": False})
        running.items.put_nowait(None)
        await task
        return items, running, replicas

    items, running, replicas = asyncio.run(go())
    assert items == [{"codes": [5, 6], "finished": False}]
    assert running.fed == [("a", (f"rows{i}",), "r1") for i in range(6)]
    assert all(not r.fed for r in replicas if r is not running)


def test_token2wav_feeds_codes_and_the_end():
    async def go():
        remote, handle, replicas = backend(RemoteToken2Wav, n=1)
        gen = remote.generate(Req("s"))
        first = asyncio.ensure_future(gen.__anext__())
        await remote.feed("s", (1, 2, 3), False)
        await remote.feed("s", [4], True)
        replicas[0].items.put_nowait({"pcm": [0.0], "sample_rate": 24000, "finished": True})
        assert (await first)["sample_rate"] == 24000
        await gen.aclose()
        return replicas[0].fed

    assert asyncio.run(go()) == [("s", ([1, 2, 3], False), "r0"), ("s", ([4], True), "r0")]


def test_feeds_after_the_end_are_dropped_and_an_early_stop_cancels_the_call():
    async def go():
        remote, handle, replicas = backend(RemoteTalker, n=1)
        gen = remote.generate(Req("b"))
        first = asyncio.ensure_future(gen.__anext__())
        await replicas[0].started.wait()
        replicas[0].items.put_nowait({"codes": [1]})
        await first
        await gen.aclose()                       # the consumer stops early (client gone)
        await asyncio.wait_for(remote.feed("b", "late"), 1)
        return handle, replicas[0]

    handle, replica = asyncio.run(go())
    assert handle.streams[0].cancelled and replica.fed == []
    assert [c for c in handle.calls if c[0] == "feed"] == []


def test_backends_of_the_speech_stages():
    from deployments.ingress.catalog import Catalog
    from omni_ray.config import OmniConfig, validate
    from omni_ray.graphs import expand_pipelines
    from tests.serve.conftest import app_config

    catalog = Catalog(expand_pipelines(validate(OmniConfig, app_config())))
    assert catalog.speech == {"omni-talker": "talker", "omni-token2wav": "token2wav"}
    keys = ["omni", "omni-talker", "omni-token2wav"]
    h = Handle([Replica("r0")])
    out = remote_backends({k: h for k in keys}, catalog, StageHealth({k: h for k in keys}))
    assert isinstance(out["omni-talker"], RemoteTalker) and isinstance(out["omni-token2wav"], RemoteToken2Wav)
    assert type(out["omni"]).__name__ == "RemoteAR"
    assert out["omni-talker"].voices and out["omni-talker"].voices == sorted(out["omni-talker"].voices)
    # parts of the omni model, not models of their own
    ids = [m["id"] for m in catalog.model_cards()]
    assert "tiny-qwen2.5-omni" in ids and not any(i.endswith(("-talker", "-token2wav")) for i in ids)
    assert catalog.modalities("omni") == {"input": ["audio", "image", "text"], "output": ["audio", "text"]}


def test_rows_of_a_handoff_by_reference_resolve_where_they_are_consumed():
    """The runner splits a thinker delta's rows (prompt | fed tokens) without resolving them; the talker
    replica resolves the references (several, joined in order) and cuts the span."""
    import torch

    from omni_ray.stages.requests import Handoff

    async def go():
        loop = asyncio.get_running_loop()
        a, b = torch.arange(12.0).reshape(4, 3), torch.arange(12.0, 21.0).reshape(3, 3)
        refs = [loop.create_future(), loop.create_future()]          # stand-ins of ObjectRefs: awaitables
        h = Handoff.join([Handoff([4, 3], ref=refs[0]), Handoff([3, 3], ref=refs[1])])
        prompt, rest = h.rows(0, 5), h.rows(5)
        tail = rest.rows(1)
        assert prompt.tensor is None and prompt.shape == [5, 3] and rest.shape == [2, 3] and tail.span == (6, 7)
        refs[0].set_result(a.numpy())
        refs[1].set_result(b.numpy())
        whole = torch.cat([a, b])
        got = [await x.resolve() for x in (prompt, rest, tail)]
        assert torch.equal(got[0], whole[:5]) and torch.equal(got[1], whole[5:]) and torch.equal(got[2], whole[6:])
        by_value = Handoff([7, 3], tensor=whole).rows(2, 4)
        assert torch.equal(await by_value.resolve(), whole[2:4]) and by_value.shape == [2, 3]

    asyncio.run(go())
