"""Pipeline runs at the ingress: ``run_pipeline`` gated by the scheduler, results as plain data, SSE."""

from typing import AsyncIterator

from deployments.ingress.http import sse
from deployments.openai.responses import b64_images
from omni_ray.config import PipelineConfig
from omni_ray.errors import OmniError
from omni_ray.runner import StageArgs, run_pipeline
from omni_ray.stages.requests import ImageInput


async def pipeline_events(backends: dict, kinds: dict, rid: str, pipe: PipelineConfig, prompt: str,
                          args: StageArgs, ticket, image: ImageInput | None = None, **inputs) -> AsyncIterator[dict]:
    """run_pipeline, with the scheduler gating and told about each stage; ``inputs``: run_pipeline's
    others (``messages``, ``audio``)."""
    current = None
    try:
        async for ev in run_pipeline(pipe, backends, kinds, prompt, rid, args, image, **inputs):
            if ev["type"] == "stage_start":
                current = ev["stage"]
                await ticket.stage_started(current)      # waits for a slot on a later stage
            elif ev["type"] == "stage_end" and ev.get("stage", current) == current:   # speech: stages overlap
                await ticket.stage_finished(current)
                current = None
            yield ev
    finally:
        if current is not None:
            await ticket.stage_finished(current)


async def pipeline_result(backends: dict, kinds: dict, rid: str, pipe: PipelineConfig, prompt: str,
                          args: StageArgs, ticket, image: ImageInput | None = None, **inputs) -> dict:
    async for ev in pipeline_events(backends, kinds, rid, pipe, prompt, args, ticket, image, **inputs):
        if ev["type"] == "result":
            return ev
    raise OmniError("pipeline ended without a result")


def public(ev: dict, images=b64_images) -> dict:
    """An event as plain data: images via ``images`` (base64 for JSON), videos as base64 MP4s, hidden
    states as metadata (the ObjectRef never leaves Ray)."""
    if ev["type"] != "result":
        return ev
    out = {k: v for k, v in ev.items() if k not in ("images", "hidden_states", "videos")}
    out["images"] = images(ev["images"]) if ev.get("images") else None
    out["videos"] = [{"b64_json": b["b64_json"], "content_type": "video/mp4"} for b in b64_images(ev["videos"])] \
        if ev.get("videos") else None
    hs = ev.get("hidden_states")
    out["hidden_states"] = hs.public() if hs else None
    return out


async def render_pipeline(rid: str, name: str, events) -> AsyncIterator[str]:
    yield sse({"type": "start", "id": rid, "pipeline": name})
    async for ev in events:
        yield sse(public(ev))
