"""Llama 3.x JSON tool calls (vLLM's ``llama3_json``): the whole message is one or more calls,

    {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

optionally after ``<|python_tag|>`` (``arguments`` is read as well as ``parameters``). A message that
does not start with ``{`` (after whitespace and the tag) is content; one that does but is not a
list of calls is content as well, whole.
"""

from __future__ import annotations

from omni_ray.tool_parsers.base import ToolParser
from omni_ray.tool_parsers.json_calls import StreamedSequence, parse_sequence, skip_ws

PYTHON_TAG = "<|python_tag|>"


def calls_start(text: str) -> int | None:
    """Where the calls begin (past whitespace and the tag), -1 if the message is content, None if
    too little text has come to tell."""
    s = text.lstrip()
    if not s:
        return None
    if s.startswith(PYTHON_TAG):
        return skip_ws(text, len(text) - len(s) + len(PYTHON_TAG))
    if s.startswith("{"):
        return len(text) - len(s)
    return None if PYTHON_TAG.startswith(s) else -1


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    sep, close = ";", None

    def __init__(self, incremental: bool = True):
        super().__init__(incremental)
        self._text = ""
        self._start: int | None = None          # None: not known yet; -1: content
        self._seq = StreamedSequence(self.sep)

    def _begin(self, text: str) -> int | None:
        return calls_start(text)

    def _feed(self, delta: str) -> None:
        if self._start == -1:
            self._content(delta)
            return
        self._text += delta
        if self._start is None:
            self._start = self._begin(self._text)
            if self._start == -1:
                self._content(self._text)
                return
        if self._start is not None and self.incremental:
            self._send(self._seq.update(self._text, self._start))

    def _end(self) -> None:
        if self._start == -1:
            return
        calls = parse_sequence(self._text, self._start, self.sep, self.close) if self._start is not None else None
        if calls is not None:
            self._send(self._seq.finish(calls))
        elif not self._seq.started:
            self._content(self._text)              # else: already streamed as calls (see base.py)

    def _send(self, moves) -> None:
        for k, name, args in moves:
            if name is not None:
                self._call(name)
            self._args(k, args)
