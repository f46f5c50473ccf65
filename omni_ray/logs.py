"""Request ids in log lines: the id the ingress gives a request follows it to every stage.

The ingress binds the id when it admits a request; a stage binds the id of the stage request it
serves (``<ingress id>-<index>``). ``RequestIdFilter`` on a logger prefixes every line logged
while an id is bound with ``[<id>]`` (and sets ``record.omni_request_id``), so grepping the
Serve logs (``/tmp/ray/session_latest/logs/serve/``) for one id finds the request at the
ingress and at each stage it went through.

    install_request_id_filter("ray.serve")      # once per process (Serve replicas)
    bind_request_id("chatcmpl-1f3...")           # in the task that serves the request
"""

from __future__ import annotations

import contextvars
import logging

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("omni_request_id", default=None)


def bind_request_id(request_id: str | None) -> contextvars.Token:
    """Bind ``request_id`` to the current asyncio task (and tasks it starts from now on); the
    token undoes it (``unbind_request_id``) where the binding must not outlive a block."""
    return REQUEST_ID.set(request_id)


def unbind_request_id(token: contextvars.Token) -> None:
    try:
        REQUEST_ID.reset(token)
    except ValueError:            # set in another context (e.g. an async generator moved tasks)
        REQUEST_ID.set(None)


def current_request_id() -> str | None:
    return REQUEST_ID.get()


class RequestIdFilter(logging.Filter):
    """Adds ``omni_request_id`` to records and ``[id]`` in front of their message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "omni_request_id", None) is not None:      # given by the caller (extra=)
            return True
        rid = REQUEST_ID.get()
        if rid is not None:
            record.omni_request_id = rid
            record.msg = f"[{rid}] {record.msg}"
        return True


def install_request_id_filter(name: str = "ray.serve") -> None:
    """Add a RequestIdFilter to logger ``name`` once (idempotent)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RequestIdFilter) for f in logger.filters):
        logger.addFilter(RequestIdFilter())
