"""Text requests at the ingress: one AR stage request per (prompt, sample), their deltas, SSE chunks."""

import dataclasses
from typing import AsyncIterator

from deployments.ingress import timing
from deployments.ingress.http import sse
from deployments.openai.responses import Choice, usage
from deployments.streams import gather_or_cancel, merge
from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.stages.requests import ARRequest


def text_requests(rid: str, prompts: list[dict], body, params: SamplingParams) -> list[tuple[int, ARRequest]]:
    """One AR stage request per (prompt, sample): choice index = prompt index * n + j (sample j of a
    seeded request gets seed + j). ``prompts``: each one's inputs ({"prompt"} or {"messages"})."""
    out = []
    for p_idx, inputs in enumerate(prompts):
        for j in range(body.n):
            p = params if j == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + j)
            idx = p_idx * body.n + j
            out.append((idx, ARRequest(f"{rid}-{idx}", **inputs, params=p, echo=getattr(body, "echo", False))))
    return out


async def text_events(backend, stage: str, reqs: list[tuple[int, ARRequest]], ticket) -> AsyncIterator[tuple]:
    """(choice index, delta) of every choice, as they come."""
    async with ticket.stage(stage):
        async for item in merge([(i, backend.generate(r)) for i, r in reqs]):
            yield item


async def collect(backend, stage: str, reqs: list[tuple[int, ARRequest]], ticket) -> list[Choice]:
    """Every choice, complete."""
    async def one(i: int, req: ARRequest) -> Choice:
        c = Choice(i)
        d = await backend.complete(req)
        c.add(d)
        if (t := timing.current()) is not None and "replica_s" in d:
            t.longest("engine", d["replica_s"])
        return c

    async with ticket.stage(stage):
        return await gather_or_cancel(one(i, r) for i, r in reqs)


async def render_text(fmt, body, indices: list[int], events) -> AsyncIterator[str]:
    """SSE chunks of ``events`` in the OpenAI format ``fmt`` (Chat or Completion), usage last when asked."""
    choices = {i: Choice(i) for i in indices}
    for i in indices:
        if (c := fmt.first_chunk(i)) is not None:
            yield sse(c)
    async for i, d in events:
        offset = choices[i].stream_offset
        choices[i].add(d)
        if ((d["text"] or d["finished"] or d.get("logprobs") or d.get("prompt_text"))
                and (c := fmt.chunk(i, d, offset)) is not None):          # None: a tool parser holds it back
            yield sse(c)
    if body.include_usage:
        cs = list(choices.values())
        yield sse(fmt.usage_chunk(usage(cs, {c.index // body.n: c.prompt_tokens for c in cs})))
