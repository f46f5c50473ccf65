"""AR streams sent to the stage together: requests that reach the ingress at the same moment share
one Serve call.

Each Serve call costs about a millisecond of router and replica work in Python, paid one request
after another: a burst of 64 streams reached the AR replica over 60-140 ms on a 2-core box, when one
call carrying all 64 took 4 ms. ``StreamBatcher.stream(req)`` gives one request's deltas exactly as
``handle.generate.remote(req)`` does, but the requests that ask within the same event-loop turn
(a burst) go out in one ``generate_batch`` call (at most ``max_batch`` each); a lone request goes
out at the next turn, without waiting, as the plain ``generate`` (or ``complete``) call it would
have been without the batcher. A caller that stops early aborts its request on the
replica that runs it (``abort(ids, replica=...)``, routed there by ``deployments.stages.routing``); when
every caller of a call has gone, the call itself is cancelled.

Serve counts a batched call as one ongoing request (its ``max_ongoing_requests`` and autoscaling
see calls, not requests); the omni scheduler's admission still counts requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from omni_ray.errors import EngineError
from omni_ray.stages.ar import merge_deltas
from omni_ray.stages.requests import ARRequest

log = logging.getLogger("ray.serve")
_END = None            # what the replica sends for a request that ended


class _Sub:
    """One request of a batched call, as its caller sees it."""

    __slots__ = ("request_id", "unary", "queue", "batch", "ended")

    def __init__(self, request_id: str, unary: bool):
        self.request_id, self.unary = request_id, unary     # unary: paced like ``complete``
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batch: _Batch | _Alone | None = None
        self.ended = False             # its last item (end or error) has been handed over


def _hand(sub: _Sub, item) -> None:
    """Give ``sub``'s caller ``item`` (a delta, ``_END`` or an exception), unless it has ended."""
    if sub.ended:
        return
    if item is _END or isinstance(item, BaseException):
        sub.ended = True
    sub.queue.put_nowait(item)


class _Batch:
    """One ``generate_batch`` call: hands each message's items to their requests' queues."""

    def __init__(self, owner: StreamBatcher, subs: list[_Sub], call):
        self.owner, self.subs, self.call = owner, subs, call
        self.replica: str | None = None
        self.replica_known = asyncio.Event()
        for s in subs:
            s.batch = self
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        err: BaseException = EngineError("AR stage call ended before its request did")
        try:
            async for items in self.call:
                for i, d in items:
                    if i < 0:
                        self.replica = d["replica"]
                        self.replica_known.set()
                    else:
                        _hand(self.subs[i], d)
        except asyncio.CancelledError:  # leave() cancels once every request has ended
            err = EngineError("AR stage call was cancelled")
            raise
        except Exception as e:  # noqa: BLE001 - the whole call failed: each request gets it
            err = e
        finally:
            self.replica_known.set()
            for s in self.subs:
                _hand(s, err)          # only the ones the call never ended

    def leave(self, sub: _Sub) -> None:
        """``sub``'s caller stopped reading before its end: abort it on the replica, or cancel the
        whole call if nothing else in it is still running."""
        if sub.ended:                  # its end was handed over already: nothing runs for it
            return
        sub.ended = True
        if all(s.ended for s in self.subs):
            self.call.cancel()         # -> CancelledError in the replica -> its engine requests abort
            self.task.cancel()
        else:
            self.owner.abort(self, sub.request_id)


class _Alone:
    """A lone request's own call: the replica's ``generate`` (its deltas, as they come) or
    ``complete`` (one delta), with no batching envelope around it."""

    def __init__(self, sub: _Sub, call, streaming: bool):
        self.sub, self.call, self.streaming = sub, call, streaming
        sub.batch = self
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            if self.streaming:
                async for d in self.call:
                    _hand(self.sub, d)
            else:
                _hand(self.sub, await self.call)
            _hand(self.sub, _END)
        except Exception as e:  # noqa: BLE001 - the caller's
            _hand(self.sub, e)

    def leave(self, sub: _Sub) -> None:
        if not sub.ended:
            sub.ended = True
            self.call.cancel()         # -> CancelledError in the replica -> its engine request aborts
            self.task.cancel()


class StreamBatcher:
    def __init__(self, streaming_handle, unary_handle, max_batch: int = 16):
        self.streaming, self.unary, self.max_batch = streaming_handle, unary_handle, max_batch
        self._pending: list[tuple[ARRequest, _Sub]] = []
        self._scheduled = False
        self._aborts: set[asyncio.Task] = set()
        self.calls = 0                 # batched calls made (stats, tests)

    async def stream(self, req: ARRequest, unary: bool = False) -> AsyncIterator[dict]:
        """The deltas of ``req``, as the AR replica yields them."""
        sub = _Sub(req.request_id, unary)
        self._pending.append((req, sub))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        done = False
        try:
            while True:
                item = await sub.queue.get()
                if item is _END:
                    done = True
                    return
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
        finally:
            if not done:
                if sub.batch is None:              # not sent yet: just drop it
                    self._pending = [(r, s) for r, s in self._pending if s is not sub]
                else:
                    sub.batch.leave(sub)

    async def complete(self, req: ARRequest) -> dict:
        """``complete(req)``: a lone request makes the replica's ``complete`` call itself, one in a
        burst rides a batched call (paced like ``complete``) and its deltas are merged here."""
        return merge_deltas([d async for d in self.stream(req, unary=True)])

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for k in range(0, len(pending), self.max_batch):
            part = pending[k:k + self.max_batch]
            self.calls += 1
            if len(part) == 1:                                  # a lone request: its own plain call
                r, sub = part[0]
                if sub.unary:
                    _Alone(sub, self.unary.complete.remote(r), streaming=False)
                else:
                    _Alone(sub, self.streaming.generate.remote(r), streaming=True)
                continue
            unary = [j for j, (_, s) in enumerate(part) if s.unary]   # paced like ``complete``
            now = time.time()                                     # the replica's step log times the hop
            _Batch(self, [s for _, s in part],
                   self.streaming.generate_batch.remote([r for r, _ in part], unary, now))

    @property
    def aborts_in_flight(self) -> int:
        return len(self._aborts)

    def abort(self, batch: _Batch, request_id: str) -> None:
        task = asyncio.ensure_future(self._abort(batch, request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, batch: _Batch, request_id: str) -> None:
        try:
            await asyncio.wait_for(batch.replica_known.wait(), 30)
            await asyncio.wait_for(self.unary.abort.remote([request_id], replica=batch.replica), 30)
        except Exception as e:  # noqa: BLE001 - the replica is gone, or so is the request
            log.debug("abort of %s failed: %r", request_id, e)
