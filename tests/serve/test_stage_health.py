"""The ingress's StageHealth without Ray: fake Serve handles whose ``broadcast("health")`` answers,
fails or hangs, as a stage's replicas do while one is replaced. The same on a real app, with a
SIGKILLed replica: tests/reliability/test_replica_restart.py."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray.exceptions as rex

from deployments.ingress.http import health_response
from deployments.ingress.stage_health import StageHealth, replica_gone
from omni_ray.config import StageHealthConfig
from omni_ray.errors import EngineError, InvalidRequestError, StageUnavailableError

CFG = StageHealthConfig(probe_timeout_s=0.2, probe_interval_s=0, unavailable_wait_s=0.5, retry_after_s=3)


class NoReplica(Exception):
    """What Serve's router raises for a broadcast when it knows no running replica."""


class FakeHandle:
    """``mode``: ok (every replica answers), dead (each replica's call fails: the actor died),
    none (the router has no replica), hang (no answer)."""

    def __init__(self, mode: str = "ok", replicas: int = 1):
        self.mode, self.replicas, self.probes = mode, replicas, 0

    def broadcast(self, method: str):
        assert method == "health"
        self.probes += 1
        handle = self

        class Response:
            async def results_async(self, *, timeout_s, return_exceptions):
                assert return_exceptions
                if handle.mode == "none":
                    raise NoReplica()
                if handle.mode == "hang":
                    await asyncio.sleep(timeout_s)
                    raise TimeoutError("Timed out waiting for broadcast results.")
                if handle.mode == "dead":
                    return [rex.ActorDiedError() for _ in range(handle.replicas)]
                return [{"status": "ok"}] * handle.replicas

        return Response()


def run(coro):
    return asyncio.run(coro)


def test_check_names_each_stage_without_a_healthy_replica():
    async def go():
        h = StageHealth({"llm": FakeHandle("dead"), "image": FakeHandle("ok"), "image-llm": FakeHandle("none")}, CFG)
        got = await h.check()
        await h.close()
        return got

    got = run(go())
    assert got["image"] is None
    assert "ActorDiedError" in got["llm"] and "no running replica" in got["image-llm"]
    resp = health_response(got, CFG.retry_after_s)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "3"
    import json
    body = json.loads(resp.body)
    assert body["status"] == "unavailable" and set(body["stages"]) == {"llm", "image-llm"}
    assert body["error"]["type"] == "engine_error" and body["error"]["code"] == "stage_unavailable"
    assert "llm" in body["error"]["message"] and "image-llm" in body["error"]["message"]
    assert health_response({"llm": None, "image": None}, 1.0) == {"status": "ok"}


def test_a_probe_that_hangs_is_bounded_and_down_unless_the_stage_delivers():
    async def go():
        h = StageHealth({"llm": FakeHandle("hang")}, CFG)
        t0 = time.monotonic()
        got = await h.check()
        elapsed = time.monotonic() - t0
        h.stages["llm"].last_output = asyncio.get_running_loop().time()     # it streams: busy, not dead
        busy = await h.check()
        await h.close()
        return got, elapsed, busy

    got, elapsed, busy = run(go())
    assert "no replica answered within 0.2 s" in got["llm"]
    assert elapsed < 1.0, "GET /health must answer within 1 s (a bound, not a speed claim)"
    assert busy == {"llm": None}


def test_concurrent_checks_share_one_probe_per_stage():
    async def go():
        handle = FakeHandle("hang")
        h = StageHealth({"llm": handle}, CFG)
        checks = asyncio.gather(*(h.check() for _ in range(5)))
        await asyncio.sleep(0.1)
        in_flight = handle.probes
        await checks
        await h.close()
        return in_flight

    assert run(go()) == 1


def test_a_request_for_a_down_stage_waits_the_bound_then_503_with_retry_after():
    async def go():
        llm, image = FakeHandle("none"), FakeHandle("ok")
        h = StageHealth({"llm": llm, "image": image}, CFG)
        await h.check()
        assert not h.is_up("llm") and h.is_up("image")
        await h.ready("image")                            # another stage's requests are not held
        t0 = time.monotonic()
        with pytest.raises(StageUnavailableError) as e:
            await h.ready("llm")
        waited = time.monotonic() - t0
        await h.close()
        return e.value, waited

    err, waited = run(go())
    assert 0.4 <= waited < 5, waited                                # the configured 0.5 s, not forever
    assert err.http_status == 503 and err.retry_after == 3 and err.stage == "llm"
    assert "'llm'" in err.message and "no running replica" in err.message
    resp = __import__("deployments.ingress.http", fromlist=["error_response"]).error_response(err)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "3"


def test_a_waiting_request_goes_on_as_soon_as_a_replica_answers():
    async def go():
        llm = FakeHandle("none")
        h = StageHealth({"llm": llm}, StageHealthConfig(probe_timeout_s=0.2, probe_interval_s=0,
                                                        unavailable_wait_s=30))
        await h.check()
        waiter = asyncio.ensure_future(h.ready("llm"))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        llm.mode = "ok"                                   # the new replica is up: the background probe sees it
        await asyncio.wait_for(waiter, 5)
        up = h.is_up("llm")
        await h.close()
        return up

    assert run(go())


def test_a_call_that_loses_its_replica_marks_the_stage_down():
    async def go():
        llm = FakeHandle("ok")
        h = StageHealth({"llm": llm}, CFG)

        async def items():
            yield {"text": "a"}
            raise rex.ActorDiedError()

        got = []
        with pytest.raises(rex.ActorDiedError):
            async for d in h.stream("llm", items):
                got.append(d)
        down = h.down()
        llm.mode = "dead"
        await asyncio.sleep(0.05)

        async def lost():
            raise rex.ActorDiedError()

        async def bad():
            raise InvalidRequestError("prompt too long")

        h2 = StageHealth({"llm": FakeHandle("ok")}, CFG)
        with pytest.raises(InvalidRequestError):         # the client's error says nothing about the replica
            await h2.unary("llm", bad)
        up_after_client_error = h2.is_up("llm")
        with pytest.raises(rex.ActorDiedError):
            await h2.unary("llm", lost)
        down2 = h2.down()
        await h.close()
        await h2.close()
        return got, down, up_after_client_error, down2

    got, down, up_after_client_error, down2 = run(go())
    assert got == [{"text": "a"}] and "ActorDiedError" in down["llm"]
    assert up_after_client_error and "llm" in down2


def test_replica_gone_unwraps_task_errors():
    assert replica_gone(rex.ActorDiedError()) and replica_gone(rex.ActorUnavailableError("x", b"0" * 16))
    assert not replica_gone(EngineError("step failed")) and not replica_gone(InvalidRequestError("bad"))


def test_a_call_sent_before_the_outage_was_noticed_is_held_to_the_same_bound():
    """A call waiting for its first answer (in Serve's router, for a replica that is gone) when its
    stage turns out to have no replica: 503 once the stage has been down for the bound, and the
    call is cancelled. A stage merely slow to answer probes cancels nothing."""
    async def go():
        llm = FakeHandle("ok")
        h = StageHealth({"llm": llm}, CFG)
        closed = []

        async def never_answers():
            try:
                await asyncio.sleep(3600)
                yield {"text": "late"}
            finally:
                closed.append(True)

        async def first(stream):
            return [d async for d in stream]

        call = asyncio.ensure_future(first(h.stream("llm", never_answers)))
        await asyncio.sleep(0.05)
        llm.mode = "dead"                                  # every replica the router knows died
        await h.check()
        t0 = time.monotonic()
        with pytest.raises(StageUnavailableError):
            await asyncio.wait_for(call, 10)
        waited = time.monotonic() - t0

        still_running = []
        for mode in ("hang", "none"):     # slow to answer; no *running* replica (a draining one finishes)
            slow = FakeHandle("ok")
            h2 = StageHealth({"llm": slow}, CFG)
            call2 = asyncio.ensure_future(first(h2.stream("llm", never_answers)))
            await asyncio.sleep(0.05)
            slow.mode = mode                               # not certain: nothing cancelled
            down = await h2.check()
            await asyncio.sleep(CFG.unavailable_wait_s + 0.3)
            still_running.append(down["llm"] is not None and not call2.done())
            call2.cancel()
            await asyncio.gather(call2, return_exceptions=True)
            await h2.close()
        await h.close()
        return waited, closed, still_running

    waited, closed, still_running = run(go())
    assert 0.4 <= waited < 5 and closed[:1] == [True]
    assert still_running == [True, True]


def test_successful_probes_leave_no_access_log_line():
    import logging

    from deployments.stages.replica import QuietProbes

    def record(msg):
        r = logging.LogRecord("ray.serve", logging.INFO, __file__, 1, msg, None, None)
        r.serve_access_log = True
        return r

    f = QuietProbes()
    assert not f.filter(record("CALL health OK 1.3ms"))
    assert f.filter(record("CALL health ERROR 2.0ms")) and f.filter(record("CALL complete OK 41.3ms"))
    plain = logging.LogRecord("ray.serve", logging.INFO, __file__, 1, "CALL health OK 1.3ms", None, None)
    assert f.filter(plain)                                   # not an access-log record: kept


def test_stage_replicas_send_client_errors_as_values_and_raise_failures():
    from deployments.stages.replica import error_as_value, errors_as_values

    closed = []

    async def deltas(fail):
        try:
            yield {"text": "a"}
            raise fail
        finally:
            closed.append(True)

    async def go():
        got = [d async for d in errors_as_values(deltas(InvalidRequestError("too long", param="prompt")))]
        with pytest.raises(EngineError):
            [d async for d in errors_as_values(deltas(EngineError("step failed")))]
        early = errors_as_values(deltas(EngineError("never reached")))
        await anext(early)
        await early.aclose()                             # the caller went away: the engine stream closes

        async def bad():
            raise InvalidRequestError("bad")

        async def broken():
            raise EngineError("broken")

        value = await error_as_value(bad())
        with pytest.raises(EngineError):
            await error_as_value(broken())
        return got, value

    got, value = run(go())
    assert got[0] == {"text": "a"} and isinstance(got[1], InvalidRequestError) and got[1].param == "prompt"
    assert isinstance(value, InvalidRequestError) and closed == [True, True, True]


def test_the_ingress_raises_a_client_error_sent_as_a_value():
    from deployments.ingress.remote_stages import stream, unary

    class Call:
        cancelled = False

        def __init__(self, items):
            self.items = items

        def __aiter__(self):
            return self._gen()

        async def _gen(self):
            for x in self.items:
                yield x

        def __await__(self):
            return self._result().__await__()

        async def _result(self):
            return self.items[-1]

        def cancel(self):
            self.cancelled = True

    async def go():
        call = Call([{"text": "a"}, InvalidRequestError("too long")])
        got = []
        with pytest.raises(InvalidRequestError):
            async for d in stream(call):
                got.append(d)
        with pytest.raises(InvalidRequestError):
            await unary(Call([InvalidRequestError("bad")]))
        return got, call.cancelled, await unary(Call([{"ok": 1}]))

    got, cancelled, ok = run(go())
    assert got == [{"text": "a"}] and not cancelled and ok == {"ok": 1}
