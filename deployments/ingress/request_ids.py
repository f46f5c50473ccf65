"""Request ids: one id per request, named by the response's ``id`` and its ``X-Request-Id`` header.

The id (``chatcmpl-…``, ``cmpl-…``, ``pipe-…``, ``img-…``) is made when the route starts the
request; it names the request in every stage, in log lines, in the scheduler, in
``POST /v1/requests/{id}/cancel`` and in the response body (``id``).

As vLLM: the id is ``<prefix>-<X-Request-Id>``, the request's ``X-Request-Id`` being the client's
own or, when it sent none, the one Serve's HTTP proxy gives every request (a UUID), and the
response carries that ``X-Request-Id`` (Serve's proxy writes it on every response; a second value
would make the header a list). So a response's id is always ``<prefix>-`` + its X-Request-Id
header, and a client can send its own id to trace a request through the logs. Without a header
(the ingress reached without Serve's proxy) the id is made here and written as the header.

Ids stay unique (the scheduler and the engines key requests by them): an X-Request-Id this ingress
replica has already used gets 8 random hex digits after it (``chatcmpl-trace-42-1a2b3c4d``). A
header that is not 1-128 characters of ``A-Z a-z 0-9 . _ : -`` is a 400 naming it.

    slot = begin(scope)             # the Gate, per HTTP request (a context variable, as Server-Timing)
    rid = ids.new("chatcmpl")       # the route (``RequestIds``, one per ingress replica)
    slot.header()                   # the Gate, when the response starts: only an id made here
"""

from __future__ import annotations

import contextvars
import re
import uuid
from collections import OrderedDict

from omni_ray.errors import InvalidRequestError

HEADER = b"x-request-id"
CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

_CURRENT: contextvars.ContextVar["RequestIdSlot | None"] = contextvars.ContextVar("omni_request_id", default=None)


class RequestIdSlot:
    """One HTTP request's X-Request-Id as it arrived, and its id once the route made it."""

    def __init__(self, incoming: str | None):
        self.incoming = incoming
        self.id: str | None = None

    def header(self) -> tuple[bytes, bytes] | None:
        """The X-Request-Id header to add: the id's own base when none came in (else Serve's proxy
        writes the incoming one)."""
        if self.id is None or self.incoming is not None:
            return None
        return HEADER, self.id.split("-", 1)[1].encode()


def begin(scope) -> RequestIdSlot:
    """A slot for this HTTP request (the Gate), seen by the route and the tasks it starts."""
    raw = next((v for k, v in scope.get("headers") or () if k.lower() == HEADER), None)
    slot = RequestIdSlot(raw.decode("latin-1") if raw is not None else None)
    _CURRENT.set(slot)
    return slot


class RequestIds:
    """Makes the ids of one ingress replica's requests, remembering the last ``remember`` bases so
    that a repeated X-Request-Id still gives a unique id."""

    def __init__(self, remember: int = 1 << 16):
        self.remember = remember
        self._seen: OrderedDict[str, None] = OrderedDict()

    def new(self, prefix: str) -> str:
        slot = _CURRENT.get()
        base = slot.incoming if slot is not None else None
        if base is None:
            base = uuid.uuid4().hex[:24]
        elif not CLIENT_ID.fullmatch(base):
            raise InvalidRequestError("the X-Request-Id header must be 1-128 characters of A-Z a-z 0-9 . _ : -, "
                                      f"got {base[:80]!r}", param="X-Request-Id")
        elif base in self._seen:
            base = f"{base}-{uuid.uuid4().hex[:8]}"
        self._seen[base] = None
        if len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        rid = f"{prefix}-{base}"
        if slot is not None:
            slot.id = rid
        return rid
