"""What every tool-call parser shares: the calls it finds, the events it streams, and ``parse``.

A parser reads a model's generated text and splits it into content (text for the user) and tool
calls (a function name and its arguments as JSON text). Each parser is a *stream*: ``feed(delta)``
returns the events that the text so far makes certain, ``end()`` the rest:

    Content(text)              text outside any call
    CallStart(index, name)     a call begins (OpenAI's first ``delta.tool_calls`` entry of a call)
    CallArgs(index, text)      the next fragment of that call's arguments

``parse(text)`` (non-streamed) feeds the whole text at once, so both paths share one code; fed one
character at a time, a stream gives the same content and calls (tests/tool_parsers). One
difference is inherent to streaming: a call whose name was already streamed and whose JSON then
turns out invalid (cut off by ``max_tokens``, or text after its closing brace) stays a call in the
stream, while ``parse`` returns its text as content (vLLM's parsers behave the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str                 # JSON text, as OpenAI's ``function.arguments``


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    name: str


@dataclass(frozen=True)
class CallArgs:
    index: int
    text: str


Event = Content | CallStart | CallArgs


@dataclass
class Parsed:
    """A whole message: ``content`` (None when the message is only tool calls) and its calls."""

    content: str | None
    calls: list[ToolCall] = field(default_factory=list)


def collect(events: list[Event]) -> Parsed:
    """The message that a list of events spells (what a client rebuilds from the stream)."""
    content, names, args = [], {}, {}
    for ev in events:
        if isinstance(ev, Content):
            content.append(ev.text)
        elif isinstance(ev, CallStart):
            names[ev.index], args[ev.index] = ev.name, ""
        else:
            args[ev.index] += ev.text
    text = "".join(content)
    calls = [ToolCall(names[i], args[i]) for i in sorted(names)]
    return Parsed(None if calls and not text.strip() else text, calls)


class ToolParser:
    """One message's stream. Subclasses implement ``_feed`` and ``_end`` and emit through
    ``_content`` / ``_call`` / ``_args``; ``incremental=False`` (``parse``) emits a call only once its
    end is known."""

    name = ""

    def __init__(self, incremental: bool = True):
        self.incremental = incremental
        self.events: list[Event] = []
        self.num_calls = 0
        self._held_ws = ""                 # trailing whitespace of the content, sent once text follows

    # ------------------------------------------------------------------ public
    def feed(self, delta: str) -> list[Event]:
        if delta:
            self._feed(delta)
        return self._take()

    def end(self) -> list[Event]:
        self._end()
        if self._held_ws and not self.num_calls:
            self.events.append(Content(self._held_ws))
        self._held_ws = ""
        return self._take()

    @classmethod
    def parse(cls, text: str, **kw) -> Parsed:
        p = cls(incremental=False, **kw)
        return collect(p.feed(text) + p.end())

    # ------------------------------------------------------------------ for subclasses
    def _feed(self, delta: str) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError

    def _content(self, text: str) -> None:
        """Content, its trailing whitespace held back until more text follows: with calls in the
        message, the content ends at its last non-space (only calls and whitespace: no content)."""
        text = self._held_ws + text
        keep = len(text.rstrip())
        if keep:
            self.events.append(Content(text[:keep]))
        self._held_ws = text[keep:]

    def _call(self, name: str) -> int:
        self.events.append(CallStart(self.num_calls, name))
        self.num_calls += 1
        return self.num_calls - 1

    def _args(self, index: int, text: str) -> None:
        if text:
            self.events.append(CallArgs(index, text))

    def _take(self) -> list[Event]:
        out, self.events = self.events, []
        return out


def held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (it may be the start of the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
