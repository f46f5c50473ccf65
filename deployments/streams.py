"""asyncio helpers for the ingress: run several stage streams as one, cancel on the way out."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import AsyncIterator, Awaitable, Iterable, TypeVar

T = TypeVar("T")
_END = object()
_CANCEL = object()
_TIMEOUT = object()


async def gather_or_cancel(coros: Iterable[Awaitable[T]]) -> list[T]:
    """``asyncio.gather`` that cancels the siblings when one fails or the caller is cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def merge(streams: list[tuple[int, AsyncIterator[T]]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave keyed streams as items arrive; cancels the unfinished ones when closed early."""
    if len(streams) == 1:
        key, it = streams[0]
        try:
            async for item in it:
                yield key, item
        finally:
            await aclose(it)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(key, it):
        try:
            async for item in it:
                queue.put_nowait((key, item))
            queue.put_nowait((key, _END))
        except BaseException as err:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((key, err))

    tasks = [asyncio.ensure_future(pump(k, it)) for k, it in streams]
    live = len(tasks)
    try:
        while live:
            key, item = await queue.get()
            if item is _END:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield key, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def aclose(it) -> None:
    """Close an async generator early (runs its ``finally``: the stage call is cancelled)."""
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


def _cancelled_error() -> Exception:
    from omni_ray.errors import RequestCancelledError
    return RequestCancelledError("request was cancelled")


async def run_cancellable(coro: Awaitable[T], cancelled: asyncio.Event | None) -> T:
    """Await ``coro``; if ``cancelled`` is set first, cancel it (downstream handle calls with it)
    and raise RequestCancelledError."""
    if cancelled is None:
        return await coro
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(cancelled.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _cancelled_error()
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _pump(it: AsyncIterator[T], queue: asyncio.Queue) -> None:
    """Move ``it``'s items into ``queue``, then ``_END`` or the exception that ended it."""
    try:
        async for item in it:
            queue.put_nowait(item)
        queue.put_nowait(_END)
    except BaseException as err:  # noqa: BLE001 - re-raised by the consumer
        queue.put_nowait(err)


async def coalesce(it: AsyncIterator[T], merge_fn, interval_s=0.0) -> AsyncIterator[T]:
    """Yield ``it``'s items, merged with ``merge_fn(items)``: whatever is waiting when the consumer
    asks, and, with ``interval_s`` (seconds, or a callable giving them), whatever arrives until
    that long after the previous yield (the first item goes at once; when ``it`` ends, what waits
    goes at once with its last items). One Serve message per batch of engine steps instead of one
    per token under load. Stopping the consumer cancels ``it``."""
    interval = interval_s if callable(interval_s) else (lambda: interval_s)
    queue: asyncio.Queue = asyncio.Queue()
    ended = asyncio.Event()            # the end is in the queue: what waits for the interval goes now
    task = asyncio.ensure_future(_pump(it, queue))
    task.add_done_callback(lambda _: ended.set())
    loop = asyncio.get_running_loop()
    last = None
    try:
        while True:
            items = [await queue.get()]
            iv = interval()
            if iv > 0 and last is not None and not _ends(items[0]):
                wait = last + iv - loop.time()
                if wait > 0 and not ended.is_set():
                    timer = loop.call_later(wait, ended.set)
                    try:
                        await ended.wait()
                    finally:
                        timer.cancel()
                    if not task.done():
                        ended.clear()
            while not queue.empty():
                items.append(queue.get_nowait())
            end = next((x for x in items if _ends(x)), None)
            values = [x for x in items if not _ends(x)]
            if values:
                yield merge_fn(values) if len(values) > 1 else values[0]
                last = loop.time()
            if end is _END:
                return
            if end is not None:
                raise end
    finally:
        if not task.done():
            task.cancel()          # -> CancelledError inside the engine generator -> engine.abort
            await asyncio.gather(task, return_exceptions=True)


class OpenStreams:
    """A replica's open streams, each sent merged messages at the interval its ``StreamingConfig``
    gives for the current count (the replica's messages per second stay within budget)."""

    def __init__(self, config):
        self.config = config
        self.count = 0

    def interval(self) -> float:
        return self.config.interval(self.count)

    async def stream(self, it: AsyncIterator[T], merge_fn) -> AsyncIterator[T]:
        """``it``'s items merged by ``merge_fn`` at this replica's current interval."""
        with self.open():
            merged = coalesce(it, merge_fn, self.interval)
            try:
                async for item in merged:
                    yield item
            finally:
                await merged.aclose()      # closed at a yield: coalesce's pump task is cancelled now

    @contextmanager
    def open(self):
        """Count a stream that paces itself (e.g. ``AsyncLLM.generate(interval=self.interval)``)."""
        self.count += 1
        try:
            yield self
        finally:
            self.count -= 1


def _ends(x) -> bool:
    return x is _END or isinstance(x, BaseException)


async def cancellable(it: AsyncIterator[T], cancelled: asyncio.Event | None = None,
                      timeout_s: float | None = None) -> AsyncIterator[T]:
    """Iterate ``it`` (in its own task) until it ends, ``cancelled`` is set (RequestCancelledError)
    or ``timeout_s`` passes (RequestTimeoutError); either way ``it`` is stopped, which cancels
    the stage calls it is waiting on."""
    from omni_ray.errors import RequestTimeoutError

    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(_pump(it, queue))
    waiter = asyncio.ensure_future(cancelled.wait()) if cancelled is not None else None
    if waiter is not None:
        waiter.add_done_callback(lambda f: None if f.cancelled() else queue.put_nowait(_CANCEL))
    timer = (asyncio.get_running_loop().call_later(timeout_s, queue.put_nowait, _TIMEOUT)
             if timeout_s is not None else None)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if item is _CANCEL:
                raise _cancelled_error()
            if item is _TIMEOUT:
                raise RequestTimeoutError(f"request exceeded {timeout_s:g}s")
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        for h in (waiter, timer):
            if h is not None:
                h.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await aclose(it)


async def prepend_all(head: list[T], rest: AsyncIterator[T], tail: list[T] = ()) -> AsyncIterator[T]:
    """``head``'s items, then ``rest``'s, then ``tail``'s (when ``rest`` ended normally)."""
    try:
        for item in head:
            yield item
        async for item in rest:
            yield item
        for item in tail:
            yield item
    finally:
        await aclose(rest)
