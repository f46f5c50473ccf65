"""Reading tool calls written as JSON objects, ``{"name": ..., "arguments": {...}}``, as they grow.

A call whose keys come in the usual order (name first, then its arguments) streams: its name once
``{"name": "...", "arguments": `` is complete, then its arguments' text as it comes. Its arguments
are the JSON text the model wrote, byte for byte (streamed and non-streamed alike). A call in
another order is known only once its JSON is complete; its arguments are then re-serialized.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from omni_ray.tool_parsers.base import ToolCall

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_WS = " \t\r\n"


def value_end(text: str, start: int) -> int | None:
    """The index just past the JSON value that starts at ``text[start]`` (None: not complete yet).
    Only the structure is followed (brackets, strings, escapes); validity is checked by ``json``."""
    if start >= len(text):
        return None
    c = text[start]
    if c == '"':
        i = start + 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                return i + 1
            i += 1
        return None
    if c in "{[":
        depth, i, in_str = 0, start, False
        while i < len(text):
            ch = text[i]
            if in_str:
                if ch == "\\":
                    i += 1
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    i = start                                    # a number, true, false, null: ends at a delimiter
    while i < len(text) and text[i] not in _WS + ",}]":
        i += 1
    return i if i < len(text) else None


@dataclass
class CallHead:
    """Where a call's parts are in the text: its name, and its arguments' value from ``args_start``
    to ``args_end`` (None while the value is not complete)."""

    name: str
    args_start: int
    args_end: int | None


def call_head(text: str, pos: int = 0) -> CallHead | None:
    """The head of a call written name first, starting at ``pos`` (None: not, or not yet)."""
    m = _HEAD.match(text, pos)
    if m is None or m.end() >= len(text):          # the value's first character decides
        return None
    try:
        name = json.loads(m.group(1))
    except ValueError:
        return None
    return CallHead(name, m.end(), value_end(text, m.end()))


def to_call(obj, raw: str, pos: int = 0) -> ToolCall | None:
    """The call a decoded JSON ``obj`` (read from ``raw[pos:]``) stands for, or None when it is not a call
    (``name`` a non-empty string; ``arguments`` or ``parameters`` an object, or absent: {})."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, dict):
        return None
    head = call_head(raw, pos)
    if head is not None and head.args_end is not None and head.name == obj["name"]:
        return ToolCall(obj["name"], raw[head.args_start:head.args_end])
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_call(body: str) -> ToolCall | None:
    """One call from the whole text of its JSON object (None: not valid JSON, or not a call)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return to_call(obj, body)


class StreamedCall:
    """One call as its text grows: ``update(text)`` returns (the name, once known and not yet
    returned; the new arguments text)."""

    def __init__(self):
        self.head: CallHead | None = None
        self.sent_args = 0
        self.whole = False              # not streamable (arguments not an object): known at the end

    def update(self, text: str) -> tuple[str | None, str]:
        new_name = None
        if self.head is None:
            if self.whole:
                return None, ""
            self.head = call_head(text)
            if self.head is None:
                return None, ""
            if text[self.head.args_start] != "{":
                self.head, self.whole = None, True
                return None, ""
            new_name = self.head.name
        else:
            self.head.args_end = value_end(text, self.head.args_start)
        end = self.head.args_end if self.head.args_end is not None else len(text)
        args = text[self.head.args_start + self.sent_args:end]
        self.sent_args += len(args)
        return new_name, args

    @property
    def started(self) -> bool:
        return self.head is not None

    def rest(self, call: ToolCall) -> str:
        """What is left of ``call``'s arguments after what was streamed."""
        return call.arguments[self.sent_args:]


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def parse_sequence(text: str, pos: int, sep: str, close: str | None = None) -> list[ToolCall] | None:
    """Calls written one after another from ``pos``, ``sep`` between them, up to ``close`` (or the end
    of the text): None unless every one is a call and nothing else is there."""
    dec, calls = json.JSONDecoder(), []
    while True:
        pos = skip_ws(text, pos)
        if pos >= len(text) or (close and text[pos] == close and not calls):
            break
        try:
            obj, end = dec.raw_decode(text, pos)
        except ValueError:
            return None
        call = to_call(obj, text, pos)
        if call is None:
            return None
        calls.append(call)
        pos = skip_ws(text, end)
        if pos < len(text) and text[pos] == sep:
            pos += 1
            continue
        break
    if close is not None:
        if pos >= len(text) or text[pos] != close:
            return None
        pos += 1
    return calls if calls and skip_ws(text, pos) == len(text) else None


class StreamedSequence:
    """``parse_sequence``'s calls as the text grows: ``update(text, pos)`` returns (call index, new
    name or None, new arguments text) for each call that moved."""

    def __init__(self, sep: str):
        self.sep = sep
        self.calls: list[tuple[int, StreamedCall]] = []

    def update(self, text: str, pos: int) -> list[tuple[int, str | None, str]]:
        out, k = [], 0
        while True:
            pos = skip_ws(text, pos)
            if pos >= len(text) or text[pos] != "{":
                return out
            if k == len(self.calls):
                self.calls.append((pos, StreamedCall()))
            start, call = self.calls[k]
            name, args = call.update(text[start:])
            if name is not None or args:
                out.append((k, name, args))
            end = value_end(text, start) if call.started else None
            if end is None:
                return out
            pos = skip_ws(text, end)
            if pos >= len(text) or text[pos] != self.sep:
                return out
            pos, k = pos + 1, k + 1

    def finish(self, calls: list[ToolCall]) -> list[tuple[int, str | None, str]]:
        """What is left to send of ``calls`` (the parsed message) after what was streamed."""
        out = []
        for k, call in enumerate(calls):
            if k < len(self.calls) and self.calls[k][1].started:
                out.append((k, None, self.calls[k][1].rest(call)))
            else:
                out.append((k, call.name, call.arguments))
        return out

    @property
    def started(self) -> bool:
        return any(c.started for _, c in self.calls)
