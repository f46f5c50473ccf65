"""Stage streams fed by later calls (speech out: the talker is fed the thinker's hidden states, token2wav the
talker's codec tokens, while their ``generate`` streams run).

    async for item in fed_stream(replica_id, request_id, engine, items): yield item

The first item names the replica, ``{"replica": id}``: the caller sends this request's ``feed`` calls with
``replica=id`` and the PinnedRouter (``deployments.stages.routing``) routes them here, to the engine that
holds the request. A client error ends the stream as its last item (a value: ``replica.py`` says why).
However the stream ends (finished, failed, or the caller cancelled it: the client went away), the
request is aborted in the engine (an abort of a finished request does nothing), so nothing it held, nor
a feed that comes after the end, is left behind.
"""

from __future__ import annotations

from typing import AsyncIterator

from deployments.stages.replica import errors_as_values


async def fed_stream(replica: str, request_id: str, engine, items: AsyncIterator[dict]) -> AsyncIterator:
    try:
        yield {"replica": replica}
        async for item in errors_as_values(items):
            yield item
    finally:
        engine.abort(request_id)
