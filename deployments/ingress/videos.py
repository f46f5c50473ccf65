"""Video jobs (``/v1/videos``): a request becomes a job at once; the job runs in the background on a
DiT stage whose model makes videos, and its MP4 is kept in the object store.

* ``POST`` checks everything it can before answering (400 naming the field: size against the model's
  stride and the stage's pixel limit, the frame count against the model's 4k + 1 and ``max_frames``,
  steps, the first frame of an image-to-video model), then answers the job (``queued``) at once.
* The job is admitted by the omni scheduler like any request (its id is the job id, so
  ``POST /v1/requests/{id}/cancel`` works too), calls the stage (``progress`` follows the denoising
  steps) and stores the MP4 the replica encoded in a DiT cache actor of its own
  (``omni-dit-cache-{app}-videos``, made on the first video: ``ttl`` strategy, ``videos.ttl_s`` and
  ``videos.max_bytes``; ``kill_cache(app)`` ends it with the app's cache); the ingress keeps no video
  bytes and writes nothing to disk.
* ``DELETE`` cancels a running job (the stage call is cancelled, which aborts the request in the DiT
  engine and frees its slot at once) and drops a finished one's MP4.

Job records live in the ingress replica that made them (``videos.max_jobs``, dropped with their
video's TTL); with several ingress replicas a poll must reach that replica (Serve's proxy does not
route by job id yet).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from deployments.ingress.input_image import input_image
from deployments.ingress.lifecycle import typed
from deployments.openai.videos import VideoGenerationRequest, video_object
from deployments.streams import cancellable
from omni_ray.config import DiTCacheConfig, OmniConfig
from omni_ray.dit.params import DiffusionParams, parse_size
from omni_ray.errors import EngineError, InvalidRequestError, ModelNotFoundError
from omni_ray.rules import check_text
from omni_ray.stages.requests import DiTRequest

log = logging.getLogger("ray.serve")


@dataclass
class VideoJob:
    id: str
    model: str
    stage: str
    created_at: float
    size: str | None
    num_frames: int | None
    fps: int
    priority: str
    status: str = "queued"
    progress: int = 0
    completed_at: float | None = None
    expires_at: float | None = None
    error: dict | None = None
    nbytes: int = 0
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def seconds(self) -> str | None:
        return None if self.num_frames is None else f"{(self.num_frames - 1) / self.fps:g}"

    @property
    def key(self) -> str:
        return f"video/{self.id}"

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class Geometry:
    """What the ingress can check of a video model without loading it."""

    stride: int | None          # height / width multiple (VAE scale x patch); None: unknown here
    temporal: int               # frames = temporal * k + 1


def read_geometry(path: str) -> Geometry:
    """From the checkpoint's vae/ and transformer/ config.json (unknown stride when it is not readable here)."""
    from omni_ray.testing import resolve_model

    try:
        root = resolve_model(path)
        vae = json.loads((root / "vae" / "config.json").read_text())
        tr = json.loads((root / "transformer" / "config.json").read_text())
    except Exception:  # noqa: BLE001 - the checkpoint lives on the GPU nodes only: the engine checks
        return Geometry(None, 4)
    patch = tr.get("patch_size") or [1, 2, 2]
    return Geometry(int(vae.get("scale_factor_spatial") or 8) * max(patch[1:]), int(vae.get("scale_factor_temporal")
                                                                                     or 4))


class VideoJobs:
    def __init__(self, config: OmniConfig, catalog, backends: dict, lifecycle, ids):
        from omni_ray.cluster.dit_cache import DiTCacheClient

        self.config, self.cfg = config, config.videos
        self.catalog, self.backends, self.lifecycle, self.ids = catalog, backends, lifecycle, ids
        store_cfg = DiTCacheConfig(strategy="ttl", ttl_s=self.cfg.ttl_s, max_bytes=self.cfg.max_bytes,
                                   cache_images=False, cache_conditioning=False, detached=config.dit_cache.detached)
        self.store = DiTCacheClient(f"{config.app.name}-videos", store_cfg)   # its actor: made on first use
        self.jobs: OrderedDict[str, VideoJob] = OrderedDict()
        self._geometry: dict[str, Geometry] = {}

    # ------------------------------------------------------------------ which stage
    def video_stages(self) -> list[str]:
        return [k for k, kind in self.catalog.kinds.items()
                if kind == "dit" and "video" in ((self.catalog.modalities(k) or {}).get("output") or [])]

    def stage_for(self, model: str | None) -> str:
        stages = self.video_stages()
        if not stages:
            raise ModelNotFoundError("this app serves no video model", param="model")
        if model is None:
            return stages[0]
        for k in stages:
            if model in (k, self.catalog.names[k]):
                return k
        if model in self.catalog.names.values() or model in self.catalog.kinds:
            raise InvalidRequestError(f"model {model!r} does not generate videos; video models: "
                                      f"{sorted(self.catalog.names[k] for k in stages)}", param="model")
        raise ModelNotFoundError(f"model {model!r} not found; video models: "
                                 f"{sorted(self.catalog.names[k] for k in stages)}", param="model")

    def geometry(self, stage: str) -> Geometry:
        if stage not in self._geometry:
            self._geometry[stage] = read_geometry(self.config.stages[stage].engine.model.path)
        return self._geometry[stage]

    # ------------------------------------------------------------------ the API
    async def create(self, body: VideoGenerationRequest) -> dict:
        stage = self.stage_for(body.model)
        check_text(body.prompt)
        engine, geo = self.config.stages[stage].engine, self.geometry(stage)
        fps = body.frame_rate(self.cfg.default_fps)
        frames = body.frames(fps, geo.temporal)
        param = "num_frames" if body.num_frames is not None else "seconds"
        if frames is not None and (frames - 1) % geo.temporal:
            raise InvalidRequestError(f"num_frames must be {geo.temporal}k + 1, got {frames}", param=param)
        if frames is not None and frames > engine.max_frames:
            raise InvalidRequestError(f"{frames} frames exceed this model's limit of {engine.max_frames}"
                                      + (f" ({(engine.max_frames - 1) / fps:g} s at {fps} fps)"
                                         if param == "seconds" else ""), param=param)
        h, w = parse_size(body.size)
        if h is not None:
            if geo.stride and (h % geo.stride or w % geo.stride):
                raise InvalidRequestError(f"size {body.size!r}: width and height must be multiples of {geo.stride} "
                                          "for this model", param="size")
            if h * w > engine.max_pixels:
                raise InvalidRequestError(f"size {body.size!r} has {h * w} pixels per frame; the limit is "
                                          f"{engine.max_pixels}", param="size")
        if body.num_inference_steps is not None and body.num_inference_steps > engine.max_steps:
            raise InvalidRequestError(f"num_inference_steps must be at most {engine.max_steps}",
                                      param="num_inference_steps")
        params = DiffusionParams(**body.diffusion(frames, h, w))
        image = await self._first_frame(stage, body)
        job = VideoJob(id=self.ids.new("video"), model=self.catalog.names[stage], stage=stage,
                       created_at=time.time(), size=body.size, num_frames=frames, fps=fps, priority=body.priority)
        req = DiTRequest(request_id=job.id, prompt=body.prompt, params=params, image=image, fps=fps)
        self._remember(job)
        job.task = asyncio.ensure_future(self._run(job, req))
        return video_object(job)

    async def _first_frame(self, stage: str, body: VideoGenerationRequest):
        param, source = body.first_frame()
        takes = "image" in ((self.catalog.modalities(stage) or {}).get("input") or [])
        if source is None:
            if "image" in (self.catalog.requires(stage) or ()):
                raise InvalidRequestError(f"model {self.catalog.names[stage]!r} makes a video from an image: give "
                                          "its first frame as input_reference", param="input_reference")
            return None
        if not takes:
            raise InvalidRequestError(f"model {self.catalog.names[stage]!r} takes no input image", param=param)
        return await input_image(source, self.config.app.media, param)

    def job(self, video_id: str) -> VideoJob:
        self._expire()
        job = self.jobs.get(video_id)
        if job is None:
            raise ModelNotFoundError(f"video {video_id!r} not found", param="video_id", code="video_not_found")
        return job

    def get(self, video_id: str) -> dict:
        return video_object(self.job(video_id))

    async def content(self, video_id: str) -> bytes:
        job = self.job(video_id)
        if job.status != "completed":
            raise InvalidRequestError(f"video {video_id!r} is {job.status}; its content is there once it is "
                                      "completed", param="video_id", code="video_not_ready")
        data = await self.store.get(job.key)
        if data is None:
            job.status, job.error = "failed", {"code": "expired", "message": "the video is no longer stored"}
            raise ModelNotFoundError(f"video {video_id!r} is no longer stored (expired or evicted)",
                                     param="video_id", code="video_expired")
        return data

    async def delete(self, video_id: str) -> dict:
        """Cancel a queued / running job (its DiT slot is freed at once) or drop a finished one's video."""
        job = self.job(video_id)
        if job.task is not None and not job.task.done():
            job.status = "cancelled"
            job.task.cancel()
            await asyncio.gather(job.task, return_exceptions=True)
        await self.store.invalidate(job.key)
        self.jobs.pop(video_id, None)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    # ------------------------------------------------------------------ the job
    async def _run(self, job: VideoJob, req: DiTRequest) -> None:
        ticket, err = None, None
        try:
            ticket = await self.lifecycle.admit(job.id, "videos", [job.stage], job.priority)
            job.status = "in_progress"
            video = None
            async with ticket.stage(job.stage):
                async for ev in cancellable(self.backends[job.stage].generate(req), ticket.cancelled):
                    if ev["kind"] == "progress":
                        job.progress = min(99, int(100 * ev["step"] / max(1, ev["total"])))
                    elif ev["kind"] == "done":
                        video = (ev.get("videos") or [None])[0]
            if video is None:
                raise EngineError(f"stage {job.stage!r} returned no video")
            if not await self.store.put(job.key, video, model=job.model, ttl_s=self.cfg.ttl_s):
                raise EngineError(f"the video ({len(video)} bytes) could not be stored (videos.max_bytes "
                                  f"{self.cfg.max_bytes}, or the store is down)")
            now = time.time()
            job.status, job.progress, job.completed_at, job.nbytes = "completed", 100, now, len(video)
            job.expires_at = now + self.cfg.ttl_s
        except asyncio.CancelledError as e:          # DELETE
            err, job.status = e, "cancelled"
        except Exception as e:  # noqa: BLE001 - the job fails; the error is its status
            err = e = typed(e)
            job.status = "cancelled" if e.http_status == 499 else "failed"
            job.error = {"code": e.code or e.error_type, "message": e.message, "param": e.param}
            if job.status == "failed":
                log.warning("video job %s failed: %s", job.id, e.message)
        finally:
            if job.done and job.expires_at is None:
                job.expires_at = time.time() + self.cfg.ttl_s
            if ticket is not None:
                await ticket.release(err)

    def _remember(self, job: VideoJob) -> None:
        self._expire()
        self.jobs[job.id] = job
        while len(self.jobs) > self.cfg.max_jobs:       # the oldest finished job goes first
            old = next((k for k, j in self.jobs.items() if j.done), None)
            if old is None:
                break
            self.jobs.pop(old)

    def _expire(self) -> None:
        now = time.time()
        for k in [k for k, j in self.jobs.items() if j.done and j.expires_at and j.expires_at < now]:
            self.jobs.pop(k)
