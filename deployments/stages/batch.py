"""Several streams in one Serve call, beside the AR stage shim: ``fan_in`` runs each request's
stream as its own task and hands their items on together, one message per event-loop wake-up
(the engine wakes every stream in one turn, so a busy replica sends one message, not one per
stream).

    async for items in fan_in(streams, replica_id, to_error): yield items

Items are (index, item), (index, error) when one stream fails (the others go on), (index, None)
when one ends; the first message starts with ``(-1, {"replica": id})`` (the caller's ``abort``
routes by it). Closing the generator cancels every stream (each engine stream then aborts its
request).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable


async def fan_in(streams: list[AsyncIterator], replica: str,
                 to_error: Callable[[Exception], Exception]) -> AsyncIterator[list[tuple[int, Any]]]:
    queue: asyncio.Queue = asyncio.Queue()

    async def one(i: int, stream: AsyncIterator) -> None:
        try:
            async for d in stream:
                queue.put_nowait((i, d))
        except Exception as e:  # noqa: BLE001 - this request's error, for its caller only
            queue.put_nowait((i, to_error(e)))
        queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(one(i, s)) for i, s in enumerate(streams)]
    live = len(tasks)
    head = [(-1, {"replica": replica})]          # rides with the first items: no message of its own
    try:
        while live:
            items = head + [await queue.get()]
            head = []
            while not queue.empty():
                items.append(queue.get_nowait())
            live -= sum(d is None for _, d in items)
            yield items
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
