"""The speech steps of the pipeline runner: Qwen2.5-Omni's thinker -> talker -> token2wav, run concurrently.

A speech pipeline (the stage graph of ``Qwen2_5OmniForConditionalGeneration``) has three steps:

    thinker   (ar)   prompt -> text            its generated tokens' hidden states go to the talker
    talker    (ar, model.submodel: talker)     text -> codec_tokens
    token2wav (dit)  codec_tokens -> audio

``run_pipeline(..., audio={"voice": ...})`` runs all three as asyncio tasks: the thinker's rows are fed to
the talker as they come (``talker.feed(id, ThinkerRows)``), the talker's codes to token2wav as they come
(``token2wav.feed(id, codes, finished)``), and each audio chunk leaves as an event as soon as it is made.
Without ``audio`` the request is text only: the thinker step alone. The voice is checked before any stage
runs. On an error, or when the caller goes away, every task is cancelled and every stage's request aborted.

The thinker's hidden states: where its stream carries them (``SamplingParams.return_hidden_states``: deltas
with ``"hidden_states"`` rows, the prompt's first, then one per generated token once it is fed), the talker
starts with the first delta and runs beside the thinker. Otherwise (a thinker stage that does not stream them)
the talker starts once the thinker ends, from ``backend.thinker_states(req, fed_ids)`` (the prompt and the fed
tokens encoded in one pass).

Backends (offline: the stage adapters in this process; online: Serve handles):
    thinker:   generate(ARRequest) -> deltas; thinker_states(req, fed_ids) (the fallback above) and
               thinker_prompt(req) -> (prompt ids, M-RoPE positions or None, rope delta) where deltas lack them
    talker:    generate(TalkerRequest) -> {"codes", "finished", ...}; async feed(id, ThinkerRows); voices
    token2wav: generate(SpeechRequest) -> {"pcm", "sample_rate", "finished"}; async feed(id, codes, finished)
    each:      abort(request_id) where it has one. Unknown keys in what they yield are ignored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, AsyncIterator, Mapping

import numpy as np
import torch

from omni_ray.ar.models.qwen2_5_omni_talker_inputs import TALKER_DEFAULTS
from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.config import PipelineConfig
from omni_ray.dit.params import DiffusionParams
from omni_ray.errors import ConfigError, EngineError, InvalidRequestError
from omni_ray.stages.requests import Handoff, SpeechRequest, TalkerRequest, ThinkerRows
from omni_ray.stages.voices import resolve_voice

SPEECH_OUTPUTS = ("codec_tokens", "audio")
AUDIO_KEYS = ("voice",)


def is_speech(pipeline: PipelineConfig) -> bool:
    return any(s.output in SPEECH_OUTPUTS for s in pipeline.steps)


def text_part(pipeline: PipelineConfig) -> PipelineConfig:
    """The steps before the talker (a text-only request to a speech graph)."""
    n = next(i for i, s in enumerate(pipeline.steps) if s.output in SPEECH_OUTPUTS)
    return pipeline.model_copy(update={"steps": pipeline.steps[:n]})


def check_audio(audio: Any, pipeline: PipelineConfig, voices) -> str:
    """The request's ``audio`` ({"voice": name}) against the pipeline: its voice's canonical name."""
    if not isinstance(audio, dict):
        raise InvalidRequestError("audio must be an object {\"voice\": ...}", param="audio")
    unknown = sorted(set(audio) - set(AUDIO_KEYS))
    if unknown:
        raise InvalidRequestError(f"audio.{unknown[0]}: unknown (audio takes {list(AUDIO_KEYS)})",
                                  param=f"audio.{unknown[0]}")
    if not is_speech(pipeline):
        raise InvalidRequestError("this model has no talker: audio output is not available", param="audio")
    if "voice" not in audio:
        raise InvalidRequestError("audio needs a voice", param="voice")
    return resolve_voice(list(voices), audio["voice"])


# what a request may set of the speech stages (``stage_args``): the talker's sampling (codec tokens: no text
# stops, constraints or logprobs), token2wav's ODE
TALKER_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed", "ignore_eos")
TOKEN2WAV_KEYS = ("num_inference_steps", "guidance_scale", "seed")


def _only(kw: dict, keys: tuple[str, ...], stage: str) -> dict:
    bad = sorted(set(kw) - set(keys))
    if bad:
        raise InvalidRequestError(f"stage_args.{stage}.{bad[0]}: not an argument of the {stage} stage (it takes "
                                  f"{list(keys)})", param=f"stage_args.{stage}.{bad[0]}")
    return dict(kw)


def _speech_steps(pipeline: PipelineConfig, kinds: Mapping[str, str]):
    steps = pipeline.steps
    shape = [(kinds[s.stage], s.input, s.output) for s in steps]
    if shape != [("ar", "prompt", "text"), ("ar", "text", "codec_tokens"), ("dit", "codec_tokens", "audio")]:
        raise ConfigError(f"a speech pipeline is thinker (ar) -> talker (ar) -> token2wav (dit); got {shape}")
    return steps


def _rows(x) -> torch.Tensor:
    """Hidden-state rows of a thinker delta: a tensor / array, or a Handoff by value."""
    if isinstance(x, Handoff):
        if x.tensor is None:
            raise EngineError("the thinker's streamed hidden states came by reference; the runner needs them "
                              "by value to split them between its feeds")
        x = x.tensor
    return torch.as_tensor(x).float()


def _as_handoff(x) -> Handoff:
    """A thinker delta's rows as a Handoff: as it came (online: object-store references, never resolved in
    the runner; offline: by value), or a tensor wrapped by value."""
    return x if isinstance(x, Handoff) else _handoff(_rows(x))


def _handoff(t: torch.Tensor) -> Handoff:
    return Handoff(shape=list(t.shape), tensor=t, dtype=str(t.dtype).removeprefix("torch."))


async def run_speech(pipeline: PipelineConfig, backends: Mapping[str, Any], kinds: Mapping[str, str],
                     prompt: str | None, request_id: str, args, voice: str,
                     messages: list[dict] | None = None, *, step_request) -> AsyncIterator[dict]:
    """The events of one speech request (module docstring); ``voice``: checked by ``check_audio``;
    ``step_request``: the runner's (``omni_ray.runner.step_request``: passed in, no import circle)."""
    steps = _speech_steps(pipeline, kinds)
    names = [s.stage for s in steps]
    thinker, talker, t2w = (backends[n] for n in names)
    rids = [f"{request_id}-{i}" for i in range(3)]

    th_params, _ = args.params_for(0, steps[0], "ar")
    if any(f.name == "return_hidden_states" for f in dataclasses.fields(SamplingParams)):
        th_params = dataclasses.replace(th_params, return_hidden_states=True)
    th_req = dataclasses.replace(step_request(0, steps[0], "ar", prompt, args, rids[0], messages=messages),
                                 params=th_params)
    per_stage = args.per_stage
    seed = {"seed": args.text["seed"]} if args.text.get("seed") is not None else {}
    # the reference's sampling; its max_new_tokens (4096) as a cap: up to the talker's context, at most
    # limits.max_tokens (the talker stage resolves None), unless the request names max_tokens
    tk_params = SamplingParams(**(TALKER_DEFAULTS | {"max_tokens": None} | seed
                                  | _only(per_stage.get(names[1], {}), TALKER_KEYS, names[1])))
    dkw = seed | _only(per_stage.get(names[2], {}), TOKEN2WAV_KEYS, names[2])
    if dkw.get("num_inference_steps") is not None and dkw["num_inference_steps"] < 2:
        raise InvalidRequestError(f"stage_args.{names[2]}.num_inference_steps must be at least 2 (time points of "
                                  "the ODE grid)", param=f"stage_args.{names[2]}.num_inference_steps")
    t2w_req = SpeechRequest(rids[2], voice, DiffusionParams(**dkw))

    events: asyncio.Queue = asyncio.Queue()
    tasks: list[asyncio.Task] = []
    loop = asyncio.get_running_loop()
    stages: list[dict] = [{}, {}, {}]
    result: dict = {"text": None, "images": None, "hidden_states": None, "videos": None}
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    t0 = time.perf_counter()

    def spawn(coro) -> None:
        task = loop.create_task(coro)
        task.add_done_callback(lambda t: events.put_nowait(("done", t)))
        tasks.append(task)

    def end(i: int, **info) -> None:
        stages[i] = {"step": i, "stage": names[i], "output": steps[i].output,
                     "elapsed_s": time.perf_counter() - t0, **info}
        events.put_nowait(("event", {"type": "stage_end", **stages[i]}))

    async def run_thinker() -> None:
        parts: list[str] = []
        tokens: list[int] = []
        fed, started, last = 0, False, None
        async for out in thinker.generate(th_req):
            if out.get("text"):
                parts.append(out["text"])
                events.put_nowait(("event", {"type": "text", "step": 0, "stage": names[0], "delta": out["text"]}))
            tokens += out.get("token_ids") or []
            if out.get("hidden_states") is not None:
                rows = _as_handoff(out["hidden_states"])      # online: references, split here unresolved
                if not started:
                    n = out["num_prompt_tokens"]
                    ids, pos, delta = out.get("prompt_token_ids"), out.get("prompt_positions"), out.get("rope_delta")
                    if ids is None:                   # the stream names no prompt ids: the stage's processing
                        ids, pos, delta = await thinker.thinker_prompt(th_req)
                    spawn(run_talker(TalkerRequest(rids[1], voice, tk_params, list(ids), rows.rows(0, n),
                                                   pos, int(delta or 0))))
                    started, rows = True, rows.rows(n)
                if rows.shape[0]:
                    await talker.feed(rids[1], ThinkerRows(tokens[fed:fed + rows.shape[0]], rows))
                    fed += rows.shape[0]
            last = out
        if last is None:
            raise EngineError(f"stage {names[0]!r} ended without output")
        if not started:                       # the thinker did not stream its states: encode them now
            if not hasattr(thinker, "thinker_states"):
                raise EngineError(f"stage {names[0]!r} streams no hidden states; the talker cannot start")
            fed_ids = tokens[:-1]             # its last token is never fed to it: no state
            ids, hidden, positions, delta = await thinker.thinker_states(th_req, fed_ids)
            h = _rows(hidden)
            spawn(run_talker(TalkerRequest(rids[1], voice, tk_params, list(ids), _handoff(h[:len(ids)]),
                                           positions, delta)))
            if fed_ids:
                await talker.feed(rids[1], ThinkerRows(fed_ids, _handoff(h[len(ids):])))
        await talker.feed(rids[1], ThinkerRows([], None, finished=True))
        usage["prompt_tokens"] += last["num_prompt_tokens"]
        usage["completion_tokens"] += last["num_output_tokens"]
        result["text"] = "".join(parts)
        end(0, finish_reason=last["finish_reason"], num_output_tokens=last["num_output_tokens"],
            hidden_states="streamed" if started else "encoded after the thinker")

    async def run_talker(req: TalkerRequest) -> None:
        num, reason, finished = 0, None, False
        async for d in talker.generate(req):
            if "codes" not in d:
                continue
            finished = bool(d.get("finished"))
            num += len(d["codes"])
            reason = d.get("finish_reason") or reason
            if d["codes"] or finished:
                await t2w.feed(rids[2], list(d["codes"]), finished)
        if not finished:
            await t2w.feed(rids[2], [], True)
        end(1, finish_reason=reason, num_codes=num)

    async def run_token2wav() -> None:
        pieces, rate = [], None
        async for d in t2w.generate(t2w_req):
            if "pcm" not in d:
                continue
            rate = d["sample_rate"]
            if len(d["pcm"]):
                pieces.append(d["pcm"])
                events.put_nowait(("event", {"type": "audio", "step": 2, "stage": names[2], "pcm": d["pcm"],
                                             "sample_rate": rate}))
        samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        result["audio"] = {"samples": samples, "sample_rate": rate, "voice": voice}
        end(2, num_chunks=len(pieces), audio_seconds=len(samples) / rate if rate else 0.0)

    for i, s in enumerate(steps):
        yield {"type": "stage_start", "step": i, "stage": s.stage, "input": s.input, "output": s.output}
    ok = False
    try:
        spawn(run_token2wav())
        spawn(run_thinker())
        done = 0
        while done < len(tasks):                    # the talker task joins once the thinker starts it
            kind, item = await events.get()
            if kind == "event":
                yield item
                continue
            done += 1
            if not item.cancelled() and item.exception() is not None:
                raise item.exception()
        while not events.empty():
            kind, item = events.get_nowait()
            if kind == "event":
                yield item
        ok = True
    finally:
        if not ok:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for backend, rid in zip((thinker, talker, t2w), rids):
                abort = getattr(backend, "abort", None)
                if abort is not None:
                    abort(rid)
    yield {"type": "result", **result, "stages": stages, "usage": usage | {
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}
