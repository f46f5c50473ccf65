"""Hermes-style tool calls, as Qwen2.5, Qwen3 and Hermes models write them (vLLM's ``hermes``):

    Let me check.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {"tz": "CET"}}
    </tool_call>

Any number of calls; the text outside them is the message's content. A last call left open (the
model stopped before ``</tool_call>``) counts when its JSON is complete. A block whose JSON is not
a call stays in the content as it was written.
"""

from __future__ import annotations

from omni_ray.tool_parsers.base import ToolParser, held_prefix
from omni_ray.tool_parsers.json_calls import StreamedCall, parse_call

START, END = "<tool_call>", "</tool_call>"


class HermesParser(ToolParser):
    name = "hermes"

    def __init__(self, incremental: bool = True):
        super().__init__(incremental)
        self._buf = ""
        self._body: str | None = None          # the open call's text (None: outside a call)
        self._open: StreamedCall | None = None
        self._index = -1

    def _feed(self, delta: str) -> None:
        self._buf += delta
        while True:
            if self._body is None:
                i = self._buf.find(START)
                if i < 0:
                    keep = held_prefix(self._buf, START)
                    self._content(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return
                self._content(self._buf[:i])
                self._buf = self._buf[i + len(START):]
                self._body, self._open = "", StreamedCall()
            else:
                j = self._buf.find(END)
                if j < 0:
                    keep = held_prefix(self._buf, END)
                    self._body += self._buf[:len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    if self.incremental:
                        self._progress()
                    return
                self._body += self._buf[:j]
                self._buf = self._buf[j + len(END):]
                self._close(closed=True)

    def _end(self) -> None:
        if self._body is None:
            self._content(self._buf)
        else:
            self._body += self._buf
            self._close(closed=False)
        self._buf = ""

    def _progress(self) -> None:
        name, args = self._open.update(self._body)
        if name is not None:
            self._index = self._call(name)
        self._args(self._index, args)

    def _close(self, closed: bool) -> None:
        call = parse_call(self._body)
        if self._open.started:
            if call is not None:                 # else: already streamed as a call (see base.py)
                self._args(self._index, self._open.rest(call))
        elif call is not None:
            self._args(self._call(call.name), call.arguments)
        else:
            self._content(START + self._body + (END if closed else ""))
        self._body, self._open = None, None
