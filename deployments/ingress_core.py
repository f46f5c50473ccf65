"""The ingress's machinery, shared by its HTTP routes (ingress.py) and its Python methods
(handle_api.py): stage lookup, admission and the request lifecycle, text and pipeline runs.

A request is admitted by the omni scheduler (a no-op ticket when it is disabled), runs under one
deadline (``app.request_timeout_s`` from arrival, admission included; past it: 504 and the stage
calls are cancelled, which aborts the request in its engines) and scheduler cancellation, and
releases its ticket with its outcome. Streams are buffered up to their first real output, so bad
input fails the HTTP request instead of the stream. Errors leave as OmniErrors (typed statuses).
"""

import asyncio
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from ray.serve.handle import DeploymentHandle

from deployments import timing
from deployments.admission import Admission
from deployments.http import DONE, as_omni, error_event, sse
from deployments.openai_format import Choice, b64_images, usage
from deployments.pipeline import RemoteAR, RemoteDiT
from deployments.services import dit_cache
from deployments.streams import OpenStreams, cancellable, gather_or_cancel, merge, prepend_all, run_cancellable
from omni_ray.config import OmniConfig, PipelineConfig, PipelineStep, validate
from omni_ray.errors import InvalidRequestError, ModelNotFoundError, OmniError, RequestTimeoutError
from omni_ray.pipeline import StageArgs, run_pipeline


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


def typed(err: Exception) -> OmniError:
    """The OmniError to raise for ``err`` (itself if it is one), so routes answer with its status."""
    return err if isinstance(err, OmniError) else as_omni(err)


class IngressCore:
    def __init__(self, config: dict, stages: dict[str, DeploymentHandle]):
        self.config: OmniConfig = validate(OmniConfig, config)
        self.handles = stages
        self.kinds = {k: s.kind for k, s in self.config.stages.items()}
        self.names = {k: s.engine.model.served_name for k, s in self.config.stages.items()}
        cache = dit_cache({"app": self.config.app.name, "dit_cache": self.config.dit_cache.model_dump()})
        batch = self.config.app.stage_call_batch
        self.backends = {k: RemoteAR(h, cache, self.names[k], batch) if self.kinds[k] == "ar" else RemoteDiT(h)
                         for k, h in stages.items()}
        self.limits = self.config.app.limits
        self.admission = Admission(self.config)
        self.open_streams = OpenStreams(self.config.app.streaming)

    # ================================================================== lookups
    def _stage(self, model: str | None, kind: str) -> str:
        """The stage key a ``model`` field names (served name or stage key); None = the first of ``kind``."""
        keys = [k for k, v in self.kinds.items() if v == kind]
        if model is None:
            if not keys:
                raise ModelNotFoundError(f"this app serves no {kind} model", param="model")
            return keys[0]
        for k in keys:
            if model in (k, self.names[k]):
                return k
        served = sorted(self.names[k] for k in keys)
        raise ModelNotFoundError(f"model {model!r} not found; available: {served}", param="model")

    def _image_pipeline(self, model: str | None) -> tuple[str, PipelineConfig]:
        """Images come from a DiT stage (a one-step pipeline) or from a named pipeline ending in images.
        A DiT stage that only takes hidden states is reached through the pipeline that feeds it."""
        p = self.config.pipelines.get(model) if model else None
        if p is not None and p.steps[-1].output == "images":
            return model, p
        stage = self._stage(model, "dit")
        feeds = [(n, p) for n, p in self.config.pipelines.items()
                 if p.steps[-1].stage == stage and p.steps[-1].input == "hidden_states"]
        direct = any(s.stage == stage and s.input != "hidden_states" for p in self.config.pipelines.values()
                     for s in p.steps)
        if feeds and not direct:
            return feeds[0]
        return self.names[stage], PipelineConfig(steps=[PipelineStep(stage=stage, input="prompt", output="images")])

    def _pipeline(self, name: str) -> PipelineConfig:
        if name not in self.config.pipelines:
            raise ModelNotFoundError(f"pipeline {name!r} not found; available: {sorted(self.config.pipelines)}",
                                     param="pipeline")
        return self.config.pipelines[name]

    def _new_deadline(self) -> float:
        """The loop time at which a request arriving now times out."""
        return asyncio.get_running_loop().time() + self.config.app.request_timeout_s

    @asynccontextmanager
    async def _deadline(self, when: float):
        """Run the body until ``when``; past it, cancel the body (and the stage calls it awaits) and
        raise RequestTimeoutError (504)."""
        try:
            async with asyncio.timeout_at(when) as cm:
                yield
        except TimeoutError:
            if not cm.expired():
                raise
            raise RequestTimeoutError(f"request exceeded {self.config.app.request_timeout_s:g}s") from None

    # ================================================================== request lifecycle
    async def _admit(self, rid: str, pipeline: str, stages: list[str], priority: str, when: float | None = None):
        """Wait for the scheduler's grant (QueueFullError -> 429), at most until the deadline."""
        try:
            async with self._deadline(when or self._new_deadline()):
                with timing.part("admit"):
                    return await self.admission.admit(rid, pipeline, stages, priority)
        except Exception as e:
            raise typed(e) from None

    async def _unary(self, rid: str, pipeline: str, stages: list[str], priority: str, work):
        """Admit, run ``work(ticket)`` under the deadline and scheduler cancellation, release."""
        when = self._new_deadline()
        ticket = await self._admit(rid, pipeline, stages, priority, when)
        err = None
        try:
            async with self._deadline(when):
                with timing.part("work"):
                    return await run_cancellable(work(ticket), ticket.cancelled)
        except Exception as e:
            err = e
            raise typed(e) from None
        except BaseException as e:     # cancelled: the client went away
            err = e
            raise
        finally:
            await ticket.release(err)

    async def _stream(self, rid: str, pipeline: str, stages: list[str], priority: str, events, ready, render):
        """Admit, open ``events(ticket)`` and buffer it up to the first ``ready`` item, so bad input
        fails the HTTP request (4xx) instead of the stream; then SSE-render the rest."""
        when = self._new_deadline()
        ticket = await self._admit(rid, pipeline, stages, priority, when)
        left = max(0.0, when - asyncio.get_running_loop().time())
        it = cancellable(events(ticket), ticket.cancelled, left)
        head = []
        try:
            with timing.part("first_event"):
                async for ev in it:
                    head.append(ev)
                    if ready(ev):
                        break
        except BaseException as e:
            await it.aclose()
            await ticket.release(e)
            raise typed(e) if isinstance(e, Exception) else e from None
        return self._sse(ticket, prepend_all(head, it), render)

    async def _sse(self, ticket, events, render) -> AsyncIterator[str]:
        err = None
        try:
            # events merged per message; [DONE] goes in the last one (the end is not held for the interval)
            async for chunk in self.open_streams.stream(prepend_all([], render(events), tail=[DONE]), "".join):
                yield chunk
        except Exception as e:         # headers are sent: report in-band
            err = e
            yield error_event(e)
            yield DONE
        except BaseException as e:     # the client went away
            err = e
            raise
        finally:
            await events.aclose()
            await ticket.release(err)

    # ================================================================== text
    def _text_requests(self, rid: str, prompts: list[dict], body, max_new: int | None, logprobs: bool):
        """One AR stage request per (prompt, sample): choice index = prompt index * n + j."""
        out = []
        for p_idx, base in enumerate(prompts):
            for j in range(body.n):
                params = body.sampling(max_new, logprobs)
                if params["seed"] is not None:
                    params["seed"] += j
                idx = p_idx * body.n + j
                out.append((idx, {"request_id": f"{rid}-{idx}", **base, "params": params}))
        return out

    async def _text_events(self, stage: str, reqs: list[tuple[int, dict]], ticket) -> AsyncIterator[tuple]:
        """(choice index, delta) of every choice, as they come."""
        backend = self.backends[stage]
        async with ticket.stage(stage):
            async for item in merge([(i, backend.generate(r)) for i, r in reqs]):
                yield item

    async def _collect(self, stage: str, reqs: list[tuple[int, dict]], ticket) -> list[Choice]:
        backend = self.backends[stage]

        async def one(i: int, req: dict) -> Choice:
            c = Choice(i)
            d = await backend.complete(req)
            c.add(d)
            if (t := timing.current()) is not None and "replica_s" in d:
                t.longest("engine", d["replica_s"])
            return c

        async with ticket.stage(stage):
            return await gather_or_cancel(one(i, r) for i, r in reqs)

    async def _render_text(self, fmt, body, indices: list[int], events) -> AsyncIterator[str]:
        choices = {i: Choice(i) for i in indices}
        for i in indices:
            if (c := fmt.first_chunk(i)) is not None:
                yield sse(c)
        async for i, d in events:
            offset = len(choices[i].text)
            choices[i].add(d)
            if d["text"] or d["finished"] or d.get("logprobs"):
                yield sse(fmt.chunk(i, d, offset))
        if body.include_usage:
            cs = list(choices.values())
            yield sse(fmt.usage_chunk(usage(cs, {c.index // body.n: c.prompt_tokens for c in cs})))

    # ================================================================== pipelines and images
    async def _pipeline_events(self, rid: str, pipe: PipelineConfig, prompt: str, args: StageArgs,
                               ticket) -> AsyncIterator[dict]:
        """run_pipeline, with the scheduler gating and told about each stage."""
        current = None
        try:
            async for ev in run_pipeline(pipe, self.backends, self.kinds, prompt, rid, args):
                if ev["type"] == "stage_start":
                    current = ev["stage"]
                    await ticket.stage_started(current)      # waits for a slot on a later stage
                elif ev["type"] == "stage_end":
                    await ticket.stage_finished(current)
                    current = None
                yield ev
        finally:
            if current is not None:
                await ticket.stage_finished(current)

    async def _pipeline_result(self, rid: str, pipe: PipelineConfig, prompt: str, args: StageArgs, ticket) -> dict:
        async for ev in self._pipeline_events(rid, pipe, prompt, args, ticket):
            if ev["type"] == "result":
                return ev
        raise OmniError("pipeline ended without a result")

    async def _run_collect(self, rid: str, name: str, pipe: PipelineConfig, prompt: str, args: StageArgs,
                           priority: str) -> dict:
        return await self._unary(rid, name, [s.stage for s in pipe.steps], priority,
                                 lambda t: self._pipeline_result(rid, pipe, prompt, args, t))

    @staticmethod
    def _public(ev: dict, images=b64_images) -> dict:
        """An event as plain data: images via ``images`` (base64 for JSON), hidden states as metadata
        (the ObjectRef never leaves Ray)."""
        if ev["type"] != "result":
            return ev
        out = {k: v for k, v in ev.items() if k not in ("images", "hidden_states")}
        out["images"] = images(ev["images"]) if ev.get("images") else None
        hs = ev.get("hidden_states")
        out["hidden_states"] = {k: v for k, v in hs.items() if k != "ref"} if hs else None
        return out

    async def _render_pipeline(self, rid: str, name: str, events) -> AsyncIterator[str]:
        yield sse({"type": "start", "id": rid, "pipeline": name})
        async for ev in events:
            yield sse(self._public(ev))

    async def describe(self) -> dict:
        import platform

        import ray
        import torch

        import omni_ray

        async def stage(k: str) -> dict:
            try:
                meta, stats = await asyncio.gather(self.handles[k].info.remote(), self.handles[k].stats.remote())
                return meta | {"stats": stats}
            except Exception as err:  # noqa: BLE001 - report, do not fail /info
                return {"kind": self.kinds[k], "model": self.names[k], "error": as_omni(err).message}

        keys = list(self.handles)
        stages = dict(zip(keys, await asyncio.gather(*(stage(k) for k in keys))))
        for k in keys:
            stages[k]["deployment"] = self.config.stages[k].deployment.model_dump()
        return {
            "app": self.config.app.name,
            "versions": {"omni_ray": omni_ray.__version__, "ray": ray.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "models": [self.names[k] for k in keys],
            "stages": stages,
            "pipelines": {n: {"description": p.description, "steps": [s.model_dump(exclude_none=True)
                                                                      for s in p.steps]}
                          for n, p in self.config.pipelines.items()},
            "scheduler": await self.admission.status(),
        }
