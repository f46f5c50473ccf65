"""Tool calls in responses: a choice's text, read by its request's parser (``ToolCalling``), as
OpenAI's ``message.tool_calls`` (non-streamed) and ``delta.tool_calls`` (streamed). ``ToolChat`` is
the ``Chat`` response format (deployments/openai/responses.py) of a request with tools.

Streamed, each call's first entry carries its ``index``, ``id``, ``type`` and ``function.name``
(with ``arguments`` "" or a first fragment), the next ones ``index`` and ``function.arguments``
fragments; text outside calls streams as ``delta.content``, as OpenAI streams them.
"""

from __future__ import annotations

from deployments.openai.responses import Chat, Choice
from deployments.openai.tools import ToolCalling, new_call_id
from omni_ray.tool_parsers import CallArgs, CallStart, Content, Event


class ChoiceToolCalls:
    """One choice's tool calls as its text comes (``incremental=False``: the whole text at once)."""

    def __init__(self, plan: ToolCalling, incremental: bool = True):
        self.plan = plan
        self.parser = plan.stream(incremental)
        self.ids: dict[int, str] = {}

    def delta(self, text: str, finished: bool) -> dict:
        """The delta fields (``content``, ``tool_calls``) that ``text`` adds; all that is left when ``finished``."""
        events = self.parser.feed(text)
        if finished:
            events += self.parser.end()
        return self._fields(events)

    def _fields(self, events: list[Event]) -> dict:
        limit = self.plan.max_calls
        content, calls = "", []
        for e in events:
            if isinstance(e, Content):
                content += e.text
            elif isinstance(e, CallStart):
                if limit is not None and e.index >= limit:
                    continue
                self.ids[e.index] = new_call_id()
                calls.append({"index": e.index, "id": self.ids[e.index], "type": "function",
                              "function": {"name": e.name, "arguments": ""}})
            elif isinstance(e, CallArgs) and e.index in self.ids:
                if calls and calls[-1]["index"] == e.index:
                    calls[-1]["function"]["arguments"] += e.text
                else:
                    calls.append({"index": e.index, "function": {"arguments": e.text}})
        out: dict = {}
        if content:
            out["content"] = content
        if calls:
            out["tool_calls"] = calls
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return self.plan.finish_reason(reason, len(self.ids))


def tool_message(plan: ToolCalling, text: str, reason: str | None) -> tuple[dict, str | None]:
    """(the assistant ``message``, its ``finish_reason``) of a whole choice."""
    calls = ChoiceToolCalls(plan, incremental=False)
    fields = calls.delta(text, finished=True)
    tool_calls = [{"id": c["id"], "type": "function", "function": c["function"]} for c in fields.get("tool_calls", [])]
    msg = {"role": "assistant", "content": fields.get("content", None if tool_calls else "")}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg, calls.finish_reason(reason)


class ToolChat:
    """A ``Chat`` format (bodies and chunks) whose messages carry tool calls: the plain bodies and
    chunks, their ``message`` / ``delta`` and ``finish_reason`` read through the request's ``ToolCalling``."""

    def __init__(self, chat: Chat, tools: ToolCalling):
        self.chat, self.tools = chat, tools
        self.id = chat.id
        self._calls: dict[int, ChoiceToolCalls] = {}        # streamed: each choice's calls so far

    def body(self, choices: list[Choice], use: dict) -> dict:
        out = self.chat.body(choices, use)
        for ch, c in zip(out["choices"], choices):
            ch["message"], ch["finish_reason"] = tool_message(self.tools, c.text, c.finish_reason)
        return out

    def first_chunk(self, index: int) -> dict | None:
        return self.chat.first_chunk(index)

    def chunk(self, index: int, d: dict, offset: int) -> dict | None:
        """The chunk of a delta; None while the parser holds all of it back (a call's start)."""
        out = self.chat.chunk(index, d, offset)
        choice = out["choices"][0]
        calls = self._calls.setdefault(index, ChoiceToolCalls(self.tools))
        choice["delta"] = calls.delta(d["text"], d["finished"])
        if d["finished"]:
            choice["finish_reason"] = calls.finish_reason(choice["finish_reason"])
        elif not choice["delta"] and not choice["logprobs"]:
            return None
        return out

    def usage_chunk(self, use: dict) -> dict:
        return self.chat.usage_chunk(use)
