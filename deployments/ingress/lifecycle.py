"""The life of one ingress request: admission, one deadline, scheduler cancellation, release.

A request is admitted by the omni scheduler (a no-op ticket when it is disabled), runs under one
deadline (``app.request_timeout_s`` from arrival, admission included; past it: 504 and the stage
calls are cancelled, which aborts the request in its engines) and scheduler cancellation, and
releases its ticket with its outcome. Streams are buffered up to their first real output, so bad
input fails the HTTP request instead of the stream. Errors leave as OmniErrors (typed statuses).
"""

import asyncio
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from deployments.ingress import timing
from deployments.ingress.admission import Admission
from deployments.ingress.http import DONE, as_omni, error_event
from deployments.streams import OpenStreams, cancellable, prepend_all, run_cancellable
from omni_ray.config import AppConfig
from omni_ray.errors import OmniError, RequestTimeoutError


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


def typed(err: Exception) -> OmniError:
    """The OmniError to raise for ``err`` (itself if it is one), so routes answer with its status."""
    return err if isinstance(err, OmniError) else as_omni(err)


class Lifecycle:
    """Runs requests of one ingress replica: ``unary`` for a result, ``stream`` for SSE."""

    def __init__(self, app: AppConfig, admission: Admission, open_streams: OpenStreams):
        self.timeout_s = app.request_timeout_s
        self.admission = admission
        self.open_streams = open_streams

    def new_deadline(self) -> float:
        """The loop time at which a request arriving now times out."""
        return asyncio.get_running_loop().time() + self.timeout_s

    @asynccontextmanager
    async def deadline(self, when: float):
        """Run the body until ``when``; past it, cancel the body (and the stage calls it awaits) and
        raise RequestTimeoutError (504)."""
        try:
            async with asyncio.timeout_at(when) as cm:
                yield
        except TimeoutError:
            if not cm.expired():
                raise
            raise RequestTimeoutError(f"request exceeded {self.timeout_s:g}s") from None

    async def admit(self, rid: str, pipeline: str, stages: list[str], priority: str, when: float | None = None):
        """Wait for the scheduler's grant (QueueFullError -> 429), at most until the deadline."""
        try:
            async with self.deadline(when or self.new_deadline()):
                with timing.part("admit"):
                    return await self.admission.admit(rid, pipeline, stages, priority)
        except Exception as e:
            raise typed(e) from None

    async def unary(self, rid: str, pipeline: str, stages: list[str], priority: str, work):
        """Admit, run ``work(ticket)`` under the deadline and scheduler cancellation, release."""
        when = self.new_deadline()
        ticket = await self.admit(rid, pipeline, stages, priority, when)
        err = None
        try:
            async with self.deadline(when):
                with timing.part("work"):
                    return await run_cancellable(work(ticket), ticket.cancelled)
        except Exception as e:
            err = e
            raise typed(e) from None
        except BaseException as e:     # cancelled: the client went away
            err = e
            raise
        finally:
            await ticket.release(err)

    async def stream(self, rid: str, pipeline: str, stages: list[str], priority: str, events, ready, render,
                     raw: bool = False):
        """Admit, open ``events(ticket)`` and buffer it up to the first ``ready`` item, so bad input
        fails the HTTP request (4xx) instead of the stream; then SSE-render the rest (``raw``: what
        ``render`` yields as it is, no ``[DONE]``, a later failure ends the response)."""
        when = self.new_deadline()
        ticket = await self.admit(rid, pipeline, stages, priority, when)
        left = max(0.0, when - asyncio.get_running_loop().time())
        it = cancellable(events(ticket), ticket.cancelled, left)
        head = []
        try:
            with timing.part("first_event"):
                async for ev in it:
                    head.append(ev)
                    if ready(ev):
                        break
        except BaseException as e:
            await it.aclose()
            await ticket.release(e)
            raise typed(e) if isinstance(e, Exception) else e from None
        return (self._raw if raw else self._sse)(ticket, prepend_all(head, it), render)

    async def _raw(self, ticket, events, render) -> AsyncIterator:
        err = None
        try:
            async for chunk in render(events):
                yield chunk
        except BaseException as e:     # a failure, or the client went away
            err = e
            raise
        finally:
            await events.aclose()
            await ticket.release(err)

    async def _sse(self, ticket, events, render) -> AsyncIterator[str]:
        err = None
        # events merged per message; [DONE] goes in the last one (the end is not held for the interval)
        merged = self.open_streams.stream(prepend_all([], render(events), tail=[DONE]), "".join)
        try:
            async for chunk in merged:
                yield chunk
        except Exception as e:         # headers are sent: report in-band
            err = e
            yield error_event(e)
            yield DONE
        except BaseException as e:     # the client went away
            err = e
            raise
        finally:
            await merged.aclose()      # closed at a yield: its pump task stops before ``events`` is closed
            await events.aclose()
            await ticket.release(err)
