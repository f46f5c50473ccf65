"""OpenAI response bodies and stream chunks, built from AR stage deltas.

A *choice* accumulates the deltas of one sampled sequence; ``Completion`` / ``Chat`` turn choices
into ``text_completion`` / ``chat.completion`` bodies and their streaming chunks.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field


def finish(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason, reason) if reason else None


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, d: dict) -> None:
        self.text += d["text"]
        self.token_ids += d["token_ids"]
        self.logprobs += d.get("logprobs") or []
        self.tokens += d.get("tokens") or []
        self.finish_reason = finish(d["finish_reason"])
        self.prompt_tokens = d["num_prompt_tokens"]
        self.completion_tokens = d["num_output_tokens"]


def usage(choices: list[Choice], prompt_per: dict[int, int] | None = None) -> dict:
    """Prompt tokens count once per prompt (n choices share it); completion tokens per choice."""
    prompt = sum((prompt_per or {c.index: c.prompt_tokens for c in choices}).values())
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Completion:
    object, chunk_object = "text_completion", "text_completion"

    def __init__(self, rid: str, model: str, logprobs: bool):
        self.id, self.model, self.with_logprobs = rid, model, logprobs
        self.created = int(time.time())

    def _logprobs(self, tokens, lps, offset: int = 0):
        if not self.with_logprobs:
            return None
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": list(tokens), "token_logprobs": list(lps), "top_logprobs": None, "text_offset": offsets}

    def body(self, choices: list[Choice], use: dict) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"index": c.index, "text": c.text, "logprobs": self._logprobs(c.tokens, c.logprobs),
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": use}

    def first_chunk(self, index: int) -> dict | None:
        return None

    def chunk(self, index: int, d: dict, offset: int) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": d["text"],
                             "logprobs": self._logprobs(d.get("tokens") or [], d.get("logprobs") or [], offset),
                             "finish_reason": finish(d["finish_reason"]) if d["finished"] else None}]}

    def usage_chunk(self, use: dict) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [], "usage": use}


class Chat(Completion):
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def _logprobs(self, tokens, lps, offset: int = 0):
        if not self.with_logprobs:
            return None
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                            for t, lp in zip(tokens, lps)]}

    def body(self, choices: list[Choice], use: dict) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": self._logprobs(c.tokens, c.logprobs), "finish_reason": c.finish_reason}
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
                             "logprobs": self._logprobs(d.get("tokens") or [], d.get("logprobs") or []),
                             "finish_reason": finish(d["finish_reason"]) if d["finished"] else None}]}


def b64_images(images: list[bytes]) -> list[dict]:
    return [{"b64_json": base64.b64encode(png).decode("ascii")} for png in images]
