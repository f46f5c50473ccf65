"""The video API's bodies and objects, after OpenAI's ``/v1/videos`` (Sora): a job is created at once
and polled; its MP4 is downloaded when it is ``completed``.

``POST /v1/videos`` (JSON) fields: ``prompt``, ``model``, ``input_reference`` (image-to-video: the first
frame, a data: URL or base64; ``image`` is accepted as its other name), ``size`` ("WxH", e.g.
"832x480"), ``seconds`` (OpenAI's; a string or a number) or ``num_frames`` (the model's frame count,
4k + 1 for Wan), ``fps``, and the diffusion extensions ``num_inference_steps``, ``guidance_scale``,
``seed``, ``negative_prompt``, ``cache``, ``priority``. ``seconds`` becomes the nearest frame count the
model takes: ``round(seconds * fps / 4) * 4 + 1`` for Wan.

The video object: ``{"id", "object": "video", "model", "status": queued | in_progress | completed |
failed | cancelled, "progress": 0..100, "created_at", "completed_at", "expires_at", "size", "seconds",
"num_frames", "fps", "error": {"code", "message"} | null}``.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from deployments.openai.protocol import D, Priority, _Body, bounded
from omni_ray.errors import InvalidRequestError


def _bad(param: str, msg: str):
    raise InvalidRequestError(msg, param=param)


class VideoGenerationRequest(_Body):
    prompt: str = Field(json_schema_extra={"minLength": 1})     # checked by the route (rules.check_text)
    model: str | None = None
    input_reference: str | None = None               # image-to-video: the first frame (data: URL or base64)
    image: str | None = None                         # the same, by the pipelines' name
    size: str | None = None
    seconds: str | int | float | None = None
    num_frames: int | None = bounded(None, D["num_frames"])
    fps: int | None = Field(None, json_schema_extra={"minimum": 1, "maximum": 120})
    num_inference_steps: int | None = bounded(None, D["num_inference_steps"])
    guidance_scale: float | None = bounded(None, D["guidance_scale"])
    seed: int | None = bounded(None, D["seed"])
    negative_prompt: str | None = None
    cache: bool | str | dict | None = None
    priority: Priority = "normal"
    user: str | None = None

    def first_frame(self) -> tuple[str, str | None]:
        """(the field that carries the input image, its value)."""
        if self.input_reference is not None and self.image is not None:
            _bad("image", "give the first frame as input_reference or as image, not both")
        return ("image", self.image) if self.image is not None else ("input_reference", self.input_reference)

    def frame_rate(self, default: int) -> int:
        fps = default if self.fps is None else self.fps
        if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 120:
            _bad("fps", f"fps must be an integer in [1, 120], got {fps!r}")
        return fps

    def frames(self, fps: int, temporal: int) -> int | None:
        """The frame count (None: the model's default) from ``num_frames`` or ``seconds``."""
        if self.seconds is not None and self.num_frames is not None:
            _bad("seconds", "give seconds or num_frames, not both")
        if self.num_frames is not None:
            return self.num_frames
        if self.seconds is None:
            return None
        try:
            s = float(self.seconds)
        except (TypeError, ValueError):
            s = math.nan
        if isinstance(self.seconds, bool) or not math.isfinite(s) or s <= 0:
            _bad("seconds", f"seconds must be a positive number, got {self.seconds!r}")
        return max(0, round(s * fps / temporal)) * temporal + 1

    def diffusion(self, num_frames: int | None, height: int | None, width: int | None) -> dict:
        kw = dict(height=height, width=width, num_frames=num_frames, num_inference_steps=self.num_inference_steps,
                  guidance_scale=self.guidance_scale, seed=self.seed, negative_prompt=self.negative_prompt,
                  cache=self.cache)
        return {k: v for k, v in kw.items() if v is not None}


def video_object(job: Any) -> dict:
    """A job as OpenAI's video object (plus this server's frame count and rate)."""
    return {"id": job.id, "object": "video", "model": job.model, "status": job.status, "progress": job.progress,
            "created_at": int(job.created_at), "completed_at": int(job.completed_at) if job.completed_at else None,
            "expires_at": int(job.expires_at) if job.expires_at else None, "size": job.size,
            "seconds": job.seconds, "num_frames": job.num_frames, "fps": job.fps, "error": job.error}
