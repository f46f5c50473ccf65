"""Which stages have a healthy replica, as one ingress replica sees them: GET /health, and the gate
in front of every stage call.

    health = StageHealth(handles, cfg.app.stage_health)    # in the ingress replica
    await health.check()       # GET /health: {stage: None (healthy) | why not}, within probe_timeout_s
    items = health.stream("llm", lambda: call_items)       # a stage call, gated and watched
    out = await health.unary("llm", lambda: call_result)

A probe broadcasts ``health`` to every replica of the stage that the ingress's Serve router knows
(``DeploymentHandle.broadcast``) and waits at most ``probe_timeout_s``: the stage is up when one
answers. It is down when none can: no replica left (Serve's router has none: at once), every
replica died (``ActorDiedError``, at once), or none answered in time while the stage delivered
nothing for ``BUSY_WINDOW_S`` (a replica that still streams is busy, not dead). A stage call that
loses its replica (``RayActorError``) marks the stage down at once. While a stage is down it is
probed every ``DOWN_PROBE_S``; a call for it waits at most ``unavailable_wait_s`` for it to come
back, then fails with StageUnavailableError (503, ``Retry-After: retry_after_s``). Other stages'
calls are not affected. Every ``probe_interval_s`` a background task probes every stage, so that a
replica that died while nothing called it is noticed before a request finds out.

A call sent before the ingress noticed waits inside Serve's router for a new replica; it is held to
the same bound: when its stage is down for certain (every replica it knows died, or a call lost its
replica: not merely slow to answer, and not merely without a *running* replica, which a graceful
delete or redeploy also shows while the draining replica finishes its calls) for
``unavailable_wait_s`` and the call has had no answer yet (no first item, no result), it is
cancelled with the same 503.

Nothing here blocks the event loop: probes are Serve handle calls awaited with a timeout, one at a
time per stage (concurrent /health requests share it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from omni_ray.config import StageHealthConfig
from omni_ray.errors import StageUnavailableError

log = logging.getLogger("ray.serve")
T = TypeVar("T")

DOWN_PROBE_S = 0.2         # how often a stage that is down is probed
BUSY_WINDOW_S = 10.0       # a stage that delivered output this recently is busy, not down, when a probe times out


def replica_gone(err: BaseException) -> bool:
    """The call lost its replica (it died, or Ray cannot reach it), as opposed to an error it raised."""
    import ray.exceptions as rex

    cause = getattr(err, "cause", None) if isinstance(err, rex.RayTaskError) else None
    if isinstance(cause, BaseException) and cause is not err:
        return replica_gone(cause)
    return isinstance(err, (rex.RayActorError, rex.ActorUnavailableError))


@dataclass
class _Stage:
    up: bool = True                         # optimistic until a probe or a call says otherwise
    reason: str = "not probed yet"
    since: float = field(default_factory=time.monotonic)
    back: asyncio.Event = field(default_factory=asyncio.Event)    # set while up
    last_output: float = -1e9               # loop time of the stage's last delivered item
    probe: asyncio.Task | None = None       # the probe in flight (shared)
    unanswered: set = field(default_factory=set)     # calls (tasks) with no first item / result yet
    expired: set = field(default_factory=set)        # those cancelled because the stage stayed down
    expiry: asyncio.TimerHandle | None = None         # cancels ``unanswered`` once down for the bound

    def __post_init__(self):
        self.back.set()


class StageHealth:
    def __init__(self, handles: dict, config: StageHealthConfig | None = None):
        self.handles = handles
        self.cfg = config or StageHealthConfig()
        self.stages = {k: _Stage() for k in handles}
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    # ------------------------------------------------------------------ state
    def is_up(self, stage: str) -> bool:
        return self.stages[stage].up

    def down(self) -> dict[str, str]:
        """{stage: why it has no healthy replica} for the stages that are down now."""
        return {k: s.reason for k, s in self.stages.items() if not s.up}

    def _set(self, stage: str, up: bool, reason: str, certain: bool = True) -> None:
        """``certain``: down because no replica exists or all died (not merely slow): calls waiting
        for their first answer are cancelled once it has lasted ``unavailable_wait_s``."""
        st = self.stages[stage]
        st.reason = reason
        if not up and certain and st.expiry is None:
            st.expiry = asyncio.get_running_loop().call_later(self.cfg.unavailable_wait_s, self._expire, stage)
        if up and st.expiry is not None:
            st.expiry.cancel()
            st.expiry = None
        if st.up == up:
            return
        now = time.monotonic()
        if up:
            log.info("stage %r has a healthy replica again after %.1f s (%s)", stage, now - st.since, reason)
            st.back.set()
        else:
            log.warning("stage %r has no healthy replica: %s", stage, reason)
            st.back.clear()
            self._ensure_running()
            if self._wake is not None:
                self._wake.set()
        st.up, st.since = up, now

    def _expire(self, stage: str) -> None:
        st = self.stages[stage]
        st.expiry = None
        if st.up:
            return
        for call in list(st.unanswered):
            st.expired.add(call)
            call.cancel()

    def failed(self, stage: str, err: BaseException) -> None:
        """A call to ``stage`` lost its replica: down until a probe finds one that answers."""
        self._set(stage, False, f"a replica was lost: {type(err).__name__}")

    # ------------------------------------------------------------------ probes
    async def probe(self, stage: str) -> str | None:
        """Probe ``stage`` (or join the probe in flight): None when healthy, else why not."""
        st = self.stages[stage]
        if st.probe is None or st.probe.done():
            st.probe = asyncio.ensure_future(self._probe(stage))
        return await asyncio.shield(st.probe)

    async def _probe(self, stage: str) -> str | None:
        t = self.cfg.probe_timeout_s
        try:
            resp = self.handles[stage].broadcast("health")
            results = await resp.results_async(timeout_s=t, return_exceptions=True)
        except TimeoutError:
            busy = asyncio.get_running_loop().time() - self.stages[stage].last_output < BUSY_WINDOW_S
            if busy:           # no answer in time, but the stage is delivering: busy, not down
                self._set(stage, True, f"busy: no probe answer within {t:g} s, but requests progress")
                return None
            return self._down(stage, f"no replica answered within {t:g} s", certain=False)
        except Exception as err:  # noqa: BLE001 - e.g. DeploymentUnavailableError: the router has no replica
            # down, but not for certain: a graceful delete or redeploy also leaves the router without a
            # running replica while the draining one still finishes the calls it holds
            return self._down(stage, f"no running replica ({type(err).__name__})", certain=False)
        ok = [r for r in results if not isinstance(r, BaseException)]
        if ok:
            self._set(stage, True, f"{len(ok)} of {len(results)} replicas answered")
            return None
        errs = sorted({type(r).__name__ for r in results})
        return self._down(stage, f"no replica answered: {len(results)} failed ({', '.join(errs)})")

    def _down(self, stage: str, reason: str, certain: bool = True) -> str:
        self._set(stage, False, reason, certain)
        return reason

    async def check(self) -> dict[str, str | None]:
        """A fresh probe of every stage, at once: {stage: None | why it has no healthy replica}."""
        keys = list(self.stages)
        return dict(zip(keys, await asyncio.gather(*(self.probe(k) for k in keys))))

    # ------------------------------------------------------------------ background
    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())

    def start(self) -> None:
        """Probe in the background (called on the replica's event loop)."""
        self._ensure_running()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = 0.0
        while True:
            if self.cfg.probe_interval_s > 0 and loop.time() >= due:
                due = loop.time() + self.cfg.probe_interval_s
                await self.check()
            elif any(not s.up for s in self.stages.values()):
                await asyncio.gather(*(self.probe(k) for k, s in self.stages.items() if not s.up))
            down = any(not s.up for s in self.stages.values())
            if not down and self.cfg.probe_interval_s <= 0:
                return                                  # nothing to watch: started again by the next failure
            wait = DOWN_PROBE_S if down else max(0.0, due - loop.time())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass

    async def close(self) -> None:
        tasks = [self._task] + [s.probe for s in self.stages.values()]
        for t in tasks:
            if t is not None:
                t.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)

    # ------------------------------------------------------------------ the gate around stage calls
    async def ready(self, stage: str) -> None:
        """Return at once while ``stage`` is up; while it is down wait for it, at most
        ``unavailable_wait_s``, then raise StageUnavailableError (503 with Retry-After)."""
        if self._task is None:                  # the background probes start with the first call
            self._ensure_running()
        st = self.stages[stage]
        if st.up:
            return
        self._ensure_running()
        try:
            await asyncio.wait_for(st.back.wait(), self.cfg.unavailable_wait_s)
        except TimeoutError:
            raise self._unavailable(stage) from None

    def _unavailable(self, stage: str) -> StageUnavailableError:
        return StageUnavailableError(
            f"stage {stage!r} has no healthy replica ({self.stages[stage].reason}); none came back within "
            f"{self.cfg.unavailable_wait_s:g} s", stage=stage, retry_after=self.cfg.retry_after_s)

    async def _answer(self, stage: str, pending: Awaitable[T]) -> T:
        """Await a call's first answer in a task of its own, which ``_expire`` cancels if the stage
        stays down for certain for the bound meanwhile (then: StageUnavailableError)."""
        st = self.stages[stage]
        task = asyncio.ensure_future(pending)
        st.unanswered.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            if task in st.expired and not asyncio.current_task().cancelling():
                raise self._unavailable(stage) from None
            raise
        finally:
            st.unanswered.discard(task)
            st.expired.discard(task)

    async def stream(self, stage: str, open_items: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
        """``open_items()``'s items once ``stage`` is ready; a lost replica marks it down."""
        await self.ready(stage)
        st = self.stages[stage]
        loop = asyncio.get_running_loop()
        items = aiter(open_items())
        try:
            try:
                item = await self._answer(stage, anext(items))
            except StopAsyncIteration:
                return
            while True:
                st.last_output = loop.time()
                yield item
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
        except Exception as err:
            if replica_gone(err):
                self.failed(stage, err)
            raise
        finally:
            close = getattr(items, "aclose", None)
            if close is not None:
                await close()

    async def unary(self, stage: str, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()`` once ``stage`` is ready; a lost replica marks it down."""
        await self.ready(stage)
        try:
            out = await self._answer(stage, call())
        except Exception as err:
            if replica_gone(err):
                self.failed(stage, err)
            raise
        self.stages[stage].last_output = asyncio.get_running_loop().time()
        return out
