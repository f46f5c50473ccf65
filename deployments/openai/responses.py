"""OpenAI response bodies and stream chunks, built from AR stage deltas.

A *choice* accumulates the deltas of one sampled sequence; ``Completion`` / ``Chat`` turn choices
into ``text_completion`` / ``chat.completion`` bodies and their streaming chunks.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

from omni_ray.ar.engine.token_bytes import text_offsets


def finish(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason, reason) if reason else None


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)       # the AR stage's entries (omni_ray/stages/ar.py)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_text: str = ""                                      # echo: the prompt, as text
    prompt_logprobs: list[dict] | None = None                  # echo with logprobs: the prompt's entries

    def add(self, d: dict) -> None:
        self.text += d["text"]
        self.token_ids += d["token_ids"]
        self.logprobs += d.get("logprobs") or []
        self.prompt_text += d.get("prompt_text") or ""
        if d.get("prompt_logprobs") is not None:
            self.prompt_logprobs = d["prompt_logprobs"]
        self.finish_reason = finish(d["finish_reason"])
        self.prompt_tokens = d["num_prompt_tokens"]
        self.completion_tokens = d["num_output_tokens"]

    @property
    def stream_offset(self) -> int:
        """Characters sent so far (the echoed prompt's included): where the next chunk's text starts."""
        return len(self.prompt_text) + len(self.text)


def usage(choices: list[Choice], prompt_per: dict[int, int] | None = None) -> dict:
    """Prompt tokens count once per prompt (n choices share it); completion tokens per choice."""
    prompt = sum((prompt_per or {c.index: c.prompt_tokens for c in choices}).values())
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _top(e: dict) -> dict[str, float] | None:
    """Completions' ``top_logprobs`` entry of one token: {text: logprob}, the token first, then its
    alternatives (k or k + 1 entries, as vLLM); None for a prompt's first token."""
    if e["top_logprobs"] is None:
        return None
    return {e["token"]: e["logprob"]} | {t["token"]: t["logprob"] for t in e["top_logprobs"]}


class Completion:
    """``text_completion`` bodies and chunks. ``logprobs``: the request asked for them (``logprobs: N``):
    ``tokens`` (each token's text), ``token_logprobs``, ``top_logprobs`` ({text: logprob}: the token and
    N alternatives) and ``text_offset``; ``echo``: the prompt's text (and, with logprobs, its tokens,
    the first one's logprob None) before the completion's."""

    object, chunk_object = "text_completion", "text_completion"

    def __init__(self, rid: str, model: str, logprobs: bool, echo: bool = False):
        self.id, self.model, self.with_logprobs, self.echo = rid, model, logprobs, echo
        self.created = int(time.time())

    def _logprobs(self, entries: list[dict], offset: int = 0) -> dict:
        offsets = text_offsets([bytes(e["bytes"]) for e in entries], offset)
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [_top(e) for e in entries], "text_offset": offsets}

    def _text_and_logprobs(self, text: str, entries: list[dict], offset: int, prompt_text: str | None,
                           prompt_entries: list[dict] | None) -> tuple[str, dict | None]:
        """The choice's text and logprobs, the echoed prompt first when there is one."""
        lps = None
        if prompt_text is not None and self.echo:
            if self.with_logprobs and prompt_entries is not None:
                lps = self._logprobs(prompt_entries, offset)
            offset += len(prompt_text)
            text = prompt_text + text
        if self.with_logprobs:
            more = self._logprobs(entries, offset)
            lps = more if lps is None else {k: lps[k] + more[k] for k in lps}
        return text, lps

    def body(self, choices: list[Choice], use: dict) -> dict:
        out = []
        for c in choices:
            text, lps = self._text_and_logprobs(c.text, c.logprobs, 0, c.prompt_text, c.prompt_logprobs)
            out.append({"index": c.index, "text": text, "logprobs": lps, "finish_reason": c.finish_reason})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": out, "usage": use}

    def first_chunk(self, index: int) -> dict | None:
        return None

    def chunk(self, index: int, d: dict, offset: int) -> dict:
        text, lps = self._text_and_logprobs(d["text"], d.get("logprobs") or [], offset, d.get("prompt_text"),
                                            d.get("prompt_logprobs"))
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": text, "logprobs": lps,
                             "finish_reason": finish(d["finish_reason"]) if d["finished"] else None}]}

    def usage_chunk(self, use: dict) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [], "usage": use}


def _chat_entry(e: dict) -> dict:
    return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}


class Chat(Completion):
    """``chat.completion`` bodies and chunks; logprobs as ``{"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}]}`` (``top_logprobs``: the request's number of them)."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def _chat_logprobs(self, entries: list[dict]) -> dict | None:
        if not self.with_logprobs:
            return None
        return {"content": [_chat_entry(e) | {"top_logprobs": [_chat_entry(t) for t in e["top_logprobs"]]}
                            for e in entries]}

    def body(self, choices: list[Choice], use: dict) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": self._chat_logprobs(c.logprobs), "finish_reason": c.finish_reason}
                            for c in choices],
                "usage": use}

    def first_chunk(self, index: int) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}

    def chunk(self, index: int, d: dict, offset: int) -> dict:
        delta = {"content": d["text"]} if d["text"] else {}
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [{"index": index, "delta": delta,
                             "logprobs": self._chat_logprobs(d.get("logprobs") or []),
                             "finish_reason": finish(d["finish_reason"]) if d["finished"] else None}]}


def b64_images(images: list[bytes]) -> list[dict]:
    return [{"b64_json": base64.b64encode(png).decode("ascii")} for png in images]
