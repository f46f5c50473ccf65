"""Qwen2.5-Omni speech out through Serve: the session app's thinker (``omni``), talker (``omni-talker``) and
token2wav (``omni-token2wav``) deployments, driven by the pipeline runner over their Serve handles as the
ingress drives them (``remote_backends``), against the offline ``OmniLLM`` on the same stages.

Greedy thinker and talker, a seeded token2wav (2 steps): text, codec tokens and waveform equal offline's. The
thinker's hidden states reach the runner only as Handoffs holding ObjectRefs (resolved in the talker replica);
two concurrent requests batch in the talker; a consumer that stops early leaves no request running in any
of the three engines."""

from __future__ import annotations

import asyncio
import contextlib
import copy

import numpy as np
import pytest

from tests.serve.conftest import app_config

pytestmark = pytest.mark.ray

APP, PIPE, STAGES = "omni", "omni", ("omni", "omni-talker", "omni-token2wav")
SPEECH = dict(max_tokens=6, temperature=0, ignore_eos=True,
              stage_args={"omni-talker": {"temperature": 0, "max_tokens": 60},
                          "omni-token2wav": {"num_inference_steps": 2, "seed": 5}})
LONG = dict(max_tokens=400, temperature=0, ignore_eos=True,           # still talking when the client leaves
            stage_args={"omni-talker": {"temperature": 0, "max_tokens": 800, "ignore_eos": True},
                        "omni-token2wav": {"num_inference_steps": 2, "seed": 5}})


def speech_config() -> dict:
    """The session app's omni stages and pipeline only (what OmniLLM runs offline)."""
    cfg = copy.deepcopy(app_config())
    return {"stages": {k: cfg["stages"][k] for k in STAGES}, "pipelines": {PIPE: cfg["pipelines"][PIPE]}}


@pytest.fixture(scope="module")
def handles(omni_url):
    from ray import serve

    return {k: serve.get_deployment_handle(k, app_name=APP) for k in STAGES}


@pytest.fixture(scope="module")
def offline():
    from omni_ray import OmniLLM

    with OmniLLM(speech_config()) as llm:
        yield llm


class Recorder:
    """What the runner hands between stages: the thinker's hidden states, the talker's prompt and feeds."""

    def __init__(self, backends):
        self.thinker_rows, self.talker_handoffs, self.codes, self.prompt_ids = [], [], {}, []
        ar, talker = backends["omni"], backends["omni-talker"]
        generate, tk_generate, feed = ar.generate, talker.generate, talker.feed

        async def thinker(req):
            async for d in generate(req):
                if d.get("hidden_states") is not None:
                    self.thinker_rows.append(d["hidden_states"])
                if d.get("prompt_token_ids"):
                    self.prompt_ids.append(d["prompt_token_ids"])
                yield d

        async def talker_generate(req):
            self.talker_handoffs.append(req.prompt_hidden)
            async for d in tk_generate(req):
                self.codes.setdefault(req.request_id, []).extend(d.get("codes", []))
                yield d

        async def talker_feed(rid, rows):
            if rows.hidden is not None:
                self.talker_handoffs.append(rows.hidden)
            await feed(rid, rows)

        ar.generate, talker.generate, talker.feed = thinker, talker_generate, talker_feed


async def run_online(handles, prompts, voice="Chelsie", stop_after_audio=False, speech=SPEECH, messages=None):
    """(per prompt: its events, the Recorder) through the Serve handles."""
    from deployments.ingress.catalog import Catalog
    from deployments.ingress.remote_stages import remote_backends
    from deployments.ingress.stage_health import StageHealth
    from omni_ray.config import OmniConfig, validate
    from omni_ray.graphs import expand_pipelines
    from omni_ray.runner import StageArgs, run_pipeline

    cfg = expand_pipelines(validate(OmniConfig, speech_config()))
    catalog = Catalog(cfg)
    health = StageHealth(handles)
    backends = remote_backends(handles, catalog, health, batch=cfg.app.stage_call_batch)
    rec = Recorder(backends)
    pipe = cfg.pipelines[PIPE]

    async def one(i, prompt):
        args = StageArgs.from_kwargs(copy.deepcopy(speech))
        args.validate(PIPE, pipe, catalog.kinds)
        events = []
        run = run_pipeline(pipe, backends, catalog.kinds, None if messages else prompt, f"sp-{i}-{id(prompts)}", args,
                           audio={"voice": voice}, messages=messages)
        async with contextlib.aclosing(run) as evs:
            async for ev in evs:
                events.append(ev)
                if stop_after_audio and ev["type"] == "audio":
                    break                               # the consumer leaves (a client that disconnects)
        return events

    try:
        out = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    finally:
        await health.close()
    return out, rec


def result(events):
    return next(e for e in events if e["type"] == "result")


def test_speech_through_serve_equals_offline_and_states_pass_by_reference(handles, offline):
    (events,), rec = asyncio.run(run_online(handles, ["Good morning"]))
    res = result(events)
    ref = offline.generate(PIPE, "Good morning", audio={"voice": "Chelsie"}, use_tqdm=False, **copy.deepcopy(SPEECH))
    assert res["text"] == ref.text and res["text"]
    assert res["audio"]["sample_rate"] == ref.sample_rate == 24000 and res["audio"]["voice"] == "Chelsie"
    wav = res["audio"]["samples"]
    assert wav.shape == ref.audio.shape and wav.size > 0
    assert np.abs(wav - ref.audio).max() <= 1e-5, np.abs(wav - ref.audio).max()
    chunks = [e["pcm"] for e in events if e["type"] == "audio"]
    assert chunks and np.array_equal(np.concatenate(chunks), wav)                 # streamed chunk by chunk
    # the thinker's states never reached this process by value: references only, resolved in the talker
    assert rec.thinker_rows and all(h.tensor is None and h.refs for h in rec.thinker_rows)
    assert rec.talker_handoffs and all(h.tensor is None and h.refs for h in rec.talker_handoffs)
    assert sum(h.shape[0] for h in rec.talker_handoffs) == sum(h.shape[0] for h in rec.thinker_rows)
    # the thinker's first delta names its prompt (no second call for the talker's prompt ids)
    assert len(rec.prompt_ids) == 1 and rec.talker_handoffs[0].shape[0] == len(rec.prompt_ids[0])
    (codes,) = rec.codes.values()
    assert len(codes) == 60 or res["stages"][1]["finish_reason"] == "stop"


def test_image_in_text_and_audio_out_equals_offline(handles, offline):
    """A chat request with an image: the thinker's M-RoPE positions reach the talker replica with its prompt."""
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 90, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe it."}]}]
    (events,), rec = asyncio.run(run_online(handles, [None], messages=msgs))
    res = result(events)
    ref = offline.generate(PIPE, messages=msgs, audio={"voice": "Chelsie"}, use_tqdm=False, **copy.deepcopy(SPEECH))
    assert res["text"] == ref.text and res["usage"]["prompt_tokens"] == ref.usage["prompt_tokens"] > 20
    assert res["audio"]["samples"].shape == ref.audio.shape and ref.audio.size > 0
    assert np.abs(res["audio"]["samples"] - ref.audio).max() <= 1e-5
    assert all(h.tensor is None and h.refs for h in rec.talker_handoffs)


def test_two_concurrent_speech_requests_batch_in_the_talker(handles, offline):
    before = handles["omni-talker"].stats.remote().result()
    prompts = ["Good morning", "The sea at night"]
    outs, _ = asyncio.run(run_online(handles, prompts, voice="Ethan"))
    after = handles["omni-talker"].stats.remote().result()
    assert after["max_batch_size"] >= 2 and after["steps"] > before["steps"]
    for prompt, events in zip(prompts, outs):
        alone = offline.generate(PIPE, prompt, audio={"voice": "Ethan"}, use_tqdm=False, **copy.deepcopy(SPEECH))
        res = result(events)
        assert res["text"] == alone.text and res["audio"]["samples"].shape == alone.audio.shape
        assert np.abs(res["audio"]["samples"] - alone.audio).max() < 3e-5      # batched vs alone: same math


def test_a_consumer_that_leaves_aborts_all_three_stages(handles):
    busy = handles["omni"].stats.remote().result()
    outs, _ = asyncio.run(run_online(handles, ["Tell me a long story about the sea"], stop_after_audio=True,
                                     speech=LONG))
    assert outs[0][-1]["type"] == "audio"                       # it left after the first chunk
    assert not any(e["type"] == "result" for e in outs[0]) and busy["num_running"] == 0

    async def idle():
        for _ in range(100):
            th, tk, t2w = await asyncio.gather(*(handles[k].stats.remote() for k in STAGES))
            if (th["num_running"] + th["num_waiting"] + tk["num_running"] + tk["num_waiting"] == 0
                    and t2w["num_streams"] == 0 and t2w["waiting_requests"] == 0):
                return th, tk, t2w
            await asyncio.sleep(0.1)
        return th, tk, t2w

    th, tk, t2w = asyncio.run(idle())
    assert th["num_running"] == th["num_waiting"] == 0, th
    assert tk["num_running"] == tk["num_waiting"] == 0, tk
    assert t2w["num_streams"] == t2w["waiting_requests"] == 0, t2w
