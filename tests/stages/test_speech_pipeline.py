"""Qwen2.5-Omni speech out through ``OmniLLM``: the stage graph thinker -> talker -> token2wav (three engines
in one process, the same runner as the Serve app) against transformers'
``Qwen2_5OmniForConditionalGeneration.generate(..., return_audio=True)``, float32 on the CPU.

The tiny checkpoint is tiny:qwen2.5-omni with its token2wav weights spread (tests/dit/omni_token2wav_utils.py),
so that the waveform is far from zero. Greedy thinker and talker; token2wav with 3 time points and the seed
drawn as the reference draws its noise (``torch.manual_seed`` right before its token2wav call: ``randn`` of
the global generator). Tolerance of the waveform: the stage synthesizes chunk by chunk (Qwen's streaming
code2wav windows, tests/dit/test_omni_token2wav_chunks.py), the reference the whole utterance at once: the
bounds of that test (max |diff| < 2e-3, relative rms < 1e-3; an utterance of one chunk: 3e-5).
"""

import asyncio
import time

import numpy as np
import pytest
import torch

from omni_ray import OmniLLM
from omni_ray.errors import InvalidRequestError
from omni_ray.runner import StageArgs, run_pipeline
from tests.dit.omni_token2wav_utils import spread_omni_checkpoint

PROMPT, THINKER_NEW, TALKER_NEW, STEPS, SEED = "Good morning", 8, 60, 3, 5   # 60 codes: 120 mel frames, 2 chunks
SPEECH = dict(max_tokens=THINKER_NEW, temperature=0, ignore_eos=True,
              stage_args={"talker": {"temperature": 0, "max_tokens": TALKER_NEW},
                          "token2wav": {"num_inference_steps": STEPS, "seed": SEED}})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return spread_omni_checkpoint(tmp_path_factory.mktemp("omni"))


def speech_config(path: str, device: str = "cpu") -> dict:
    ar = {"device": device, "enforce_eager": device == "cpu", "cache": {"num_blocks": 64},
          "scheduler": {"max_num_batched_tokens": 1024, "max_num_seqs": 4, "max_model_len": 1024}}
    model = {"path": path} | ({"dtype": "float32"} if device != "cpu" else {})
    return {"stages": {"thinker": {"kind": "ar", "engine": {"model": model} | ar},
                       "talker": {"kind": "ar", "engine": {"model": model | {"submodel": "talker"}} | ar},
                       "token2wav": {"kind": "dit", "engine": {"model": {"path": path}, "device": device}}},
            "pipelines": {"omni": {"graph": {"model": "thinker",
                                             "stages": {"talker": "talker", "token2wav": "token2wav"}}},
                          "text": {"steps": [{"stage": "thinker"}]}}}


@pytest.fixture(scope="module")
def omni(ckpt):
    with OmniLLM(speech_config(str(ckpt))) as o:
        yield record_codes(o)


def record_codes(o: OmniLLM) -> OmniLLM:
    """``o.codes``: the codec tokens each talker request yields (by request id, in order)."""
    o.codes = {}
    talker = o.stage("talker")
    generate = talker.generate

    async def recorded(req):
        async for d in generate(req):
            o.codes.setdefault(req.request_id, []).extend(d["codes"])
            yield d

    talker.generate = recorded
    return o


def _last_codes(omni, n=1):
    return list(omni.codes.values())[-n:]


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import Qwen2_5OmniForConditionalGeneration

    return Qwen2_5OmniForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(hf_model, omni):
    """transformers' whole model: (thinker tokens, talker codes, waveform) of PROMPT under the chat template."""
    from omni_ray.stages.ar import render_chat

    ids = render_chat(omni.stage("thinker").tokenizer, [{"role": "user", "content": PROMPT}])
    return run_reference(hf_model, THINKER_NEW, TALKER_NEW, STEPS, SEED, input_ids=torch.tensor([ids]))


def run_reference(model, thinker_new: int, talker_new: int, steps: int, seed: int, **inputs):
    """(thinker tokens, talker codes without the end token, waveform) of ``model.generate(return_audio=True)``,
    greedy, the token2wav noise drawn right after ``torch.manual_seed(seed)``.

    transformers >= 5.2x's ``generate`` drops an all-ones attention mask, and the talker's forward does its prompt
    set-up only when it gets one: the codec pad / start embeddings added to its last two prompt rows, and its
    M-RoPE positions (``get_rope_index`` over the thinker's prompt: media positions) with the decode offset. Without
    a mask its speech path skips both (1-D positions, no codec rows), unlike the model's definition and Qwen's own
    code; the hook below does that set-up in that case, as the talker's forward would with the mask."""
    got = {}
    talker_generate = model.talker.generate
    tk = model.config.talker_config
    codec = model.talker.get_input_embeddings().weight

    def talker(**kw):
        kw.pop("pixel_values", None)     # transformers 5 hands the thinker's pixel_values on; the talker refuses them
        out = talker_generate(**kw)
        got["codes"] = out[0, kw["input_ids"].shape[1]:].tolist()
        return out

    def draw_noise(*_):
        torch.manual_seed(seed)

    def prompt_setup(mod, args, kw):
        if kw.get("attention_mask") is not None or kw.get("position_ids") is not None:
            return args, kw                          # the forward does it itself
        cache = kw.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        e = kw.get("inputs_embeds")
        if past == 0 and e is not None:
            e = e.clone()
            e[:, -1] += codec[tk.tts_codec_start_token_id]
            e[:, -2] += codec[tk.tts_codec_pad_token_id]
            text = kw["input_text_ids"]
            pos, got["delta"] = mod.get_rope_index(text, kw.get("image_grid_thw"), kw.get("video_grid_thw"),
                                                   torch.ones_like(text), kw.get("use_audio_in_video"),
                                                   kw.get("audio_feature_lengths"), kw.get("video_second_per_grid"))
            return args, kw | {"inputs_embeds": e, "position_ids": pos}
        n = (kw["input_ids"] if kw.get("input_ids") is not None else e).shape[1]
        pos = (torch.arange(n) + past + got["delta"]).view(1, 1, -1).expand(3, 1, -1)
        return args, kw | {"position_ids": pos}

    model.talker.generate = talker
    hooks = [model.token2wav.register_forward_pre_hook(draw_noise),
             model.talker.register_forward_pre_hook(prompt_setup, with_kwargs=True)]
    try:
        with torch.no_grad():
            seq, wav = model.generate(**inputs, speaker="Chelsie", thinker_max_new_tokens=thinker_new,
                                      thinker_min_new_tokens=thinker_new, thinker_do_sample=False,
                                      talker_do_sample=False, talker_max_new_tokens=talker_new,
                                      talker_eos_token_id=[tk.tts_codec_pad_token_id, tk.tts_codec_end_token_id],
                                      token2wav_num_steps=steps)
    finally:
        for h in hooks:
            h.remove()
        del model.talker.generate
    stops = {tk.tts_codec_pad_token_id, tk.tts_codec_end_token_id}
    codes = got["codes"]
    codes = codes[:next((i for i, c in enumerate(codes) if c in stops), len(codes))]
    return seq[0, inputs["input_ids"].shape[1]:].tolist(), codes, wav.numpy()


def _close(got: np.ndarray, want: np.ndarray, chunks: int) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    diff = np.abs(got - want)
    rms = np.sqrt((want ** 2).mean())
    assert rms > 0.01                                          # a waveform, not silence
    if chunks == 1:
        assert diff.max() < 3e-5, diff.max()
    else:
        assert diff.max() < 2e-3 and np.sqrt((diff ** 2).mean()) / rms < 1e-3, (diff.max(), rms)


def test_speech_equals_transformers(omni, reference):
    """Thinker tokens, talker codes and the waveform of the offline speech run equal the reference's."""
    tokens, codes, wav = reference
    out = omni.generate("omni", PROMPT, audio={"voice": "Chelsie"}, use_tqdm=False, **SPEECH)
    assert out.text == omni.stage("thinker").tokenizer.decode(tokens)
    assert len(tokens) == THINKER_NEW and out.usage["completion_tokens"] == THINKER_NEW
    assert _last_codes(omni) == [codes] and len(codes) == TALKER_NEW
    assert out.sample_rate == 24000 and out.voice == "Chelsie"
    assert [s["stage"] for s in out.stages] == ["thinker", "talker", "token2wav"]
    assert out.stages[0]["hidden_states"] == "streamed" and out.stages[2]["num_chunks"] == 2
    _close(out.audio, wav, chunks=2)


def test_audio_events_stream_in_order(omni, reference):
    """The runner's events: text deltas, then one audio event per chunk; the chunks concatenate to the result."""
    pipe, kinds = omni.config.pipelines["omni"], omni._kinds()
    backends = {s.stage: omni._backend(s.stage) for s in pipe.steps}
    args = StageArgs.from_kwargs(SPEECH)
    args.validate("omni", pipe, kinds)

    async def run():
        gen = run_pipeline(pipe, backends, kinds, PROMPT, "ev-1", args, audio={"voice": "chelsie"})
        return [ev async for ev in gen]

    events = omni._run(run())
    audio = [e for e in events if e["type"] == "audio"]
    assert len(audio) == 2 and all(e["sample_rate"] == 24000 and e["stage"] == "token2wav" for e in audio)
    result = events[-1]
    assert result["type"] == "result" and result["audio"]["voice"] == "Chelsie"       # the checkpoint's name
    assert np.array_equal(np.concatenate([e["pcm"] for e in audio]), result["audio"]["samples"])
    _close(result["audio"]["samples"], reference[2], chunks=2)


def test_concurrent_requests_batch_in_talker_and_token2wav(omni):
    """Two speech requests at once: the talkers share engine steps, so do the token2wav windows; each gets what
    it gets alone."""
    prompts = ["Good morning", "The lighthouse"]
    alone = []
    for p in prompts:
        alone.append(omni.generate("omni", p, audio={"voice": "Ethan"}, use_tqdm=False, **SPEECH))
        alone[-1].codes = _last_codes(omni)[0]
    talker0, t2w0 = omni.stage("talker").stats()["max_batch_size"], omni.stage("token2wav").stats()["max_batch_size"]
    assert talker0 == 1 and t2w0 >= 1
    both = omni.generate("omni", prompts, audio={"voice": "Ethan"}, use_tqdm=False, **SPEECH)
    assert omni.stage("talker").stats()["max_batch_size"] >= 2
    assert omni.stage("token2wav").stats()["max_batch_size"] > t2w0
    assert sorted(map(tuple, _last_codes(omni, 2))) == sorted(tuple(a.codes) for a in alone)
    for a, b in zip(alone, both):
        assert a.text == b.text
        assert a.audio.shape == b.audio.shape and np.abs(a.audio - b.audio).max() < 3e-5


@pytest.mark.parametrize("media,min_codes", [("image", 4), ("image+audio", 1)])
def test_media_in_text_and_audio_out(omni, hf_model, ckpt, media, min_codes):
    """Chat requests with an image (and an audio clip): the thinker's M-RoPE prompt positions and its states go to
    the talker (media rows without their embedding); text, codes and audio equal the reference's (one chunk), and
    the text equals that of the request without audio out. (With the clip this tiny talker ends after 1 code.)"""
    from tests.ar.test_mm_encoders import _image, _wave, auto_processor
    from tests.stages.test_media_stage import _wav_b64

    img, wave = _image(64, 90, 1), _wave(16000, 4)
    parts = [{"type": "image", "image": img}]
    if media == "image+audio":
        parts.append({"type": "input_audio", "input_audio": {"data": _wav_b64(wave), "format": "wav"}})
    msgs = [{"role": "user", "content": parts + [{"type": "text", "text": "Describe it."}]}]
    kw = dict(max_tokens=4, temperature=0, ignore_eos=True, stage_args={
        "talker": {"temperature": 0, "max_tokens": 12}, "token2wav": {"num_inference_steps": 2, "seed": 0}})
    out = omni.generate("omni", messages=msgs, audio={"voice": "Chelsie"}, use_tqdm=False, **kw)
    codes = _last_codes(omni)[0]
    text = omni.generate("omni", messages=msgs, use_tqdm=False, **kw)
    assert out.text == text.text and text.audio is None

    proc = auto_processor(ckpt)
    chat = proc.apply_chat_template([{"role": "user", "content": [{"type": p["type"].removeprefix("input_")}
                                                                  for p in parts] + msgs[0]["content"][-1:]}],
                                    add_generation_prompt=True, tokenize=False)
    audio = {"audio": [wave]} if media == "image+audio" else {}
    inputs = dict(proc(text=[chat], images=[img], return_tensors="pt", **audio))
    tokens, ref_codes, wav = run_reference(hf_model, 4, 12, 2, 0, **inputs)
    assert out.usage["prompt_tokens"] == inputs["input_ids"].shape[1] > 20      # the placeholders count
    assert out.text == omni.stage("thinker").tokenizer.decode(tokens)
    assert codes == ref_codes and len(codes) >= min_codes, (codes, ref_codes)
    _close(out.audio, wav, chunks=1)


def test_text_only_request_skips_the_talker(omni):
    talker, t2w = omni.stage("talker").stats(), omni.stage("token2wav").stats()
    out = omni.generate("omni", PROMPT, max_tokens=4, temperature=0, use_tqdm=False)
    assert out.text and out.audio is None and [s["stage"] for s in out.stages] == ["thinker"]
    conv = [{"role": "user", "content": PROMPT}]                  # the same as chat messages, two conversations
    both = omni.generate("omni", messages=[conv, conv], max_tokens=4, temperature=0, use_tqdm=False)
    assert [o.text for o in both] == [out.text] * 2 and all(o.prompt is None and o.audio is None for o in both)
    assert omni.stage("talker").stats()["steps"] == talker["steps"]
    assert omni.stage("token2wav").stats()["requests_added"] == t2w["requests_added"]


def test_bad_audio_requests_are_refused_before_any_stage_runs(omni):
    before = omni.stage("thinker").stats()["steps"]
    with pytest.raises(InvalidRequestError) as e:
        omni.generate("omni", PROMPT, audio={"voice": "Nobody"}, use_tqdm=False)
    assert e.value.param == "voice" and "Chelsie" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        omni.generate("omni", PROMPT, audio={"voice": "Chelsie", "speed": 2}, use_tqdm=False)
    assert e.value.param == "audio.speed"
    with pytest.raises(InvalidRequestError) as e:             # a pipeline without a talker
        omni.generate("text", PROMPT, audio={"voice": "Chelsie"}, use_tqdm=False)
    assert e.value.param == "audio"
    assert omni.stage("thinker").stats()["steps"] == before


def test_cancelling_aborts_all_three_stages(omni):
    """The caller leaves at the first text delta (thinker running) or at the first audio chunk (talker and
    token2wav running): every stage's request is aborted and every engine is left idle and working."""
    pipe, kinds = omni.config.pipelines["omni"], omni._kinds()
    backends = {s.stage: omni._backend(s.stage) for s in pipe.steps}
    aborted = []
    for b in backends.values():
        b.abort = (lambda f: lambda rid: (aborted.append(rid), f(rid)))(b.abort)
    args = StageArgs.from_kwargs(SPEECH)
    args.validate("omni", pipe, kinds)

    async def leave_at(kind: str, rid: str):
        gen = run_pipeline(pipe, backends, kinds, PROMPT, rid, args, audio={"voice": "Chelsie"})
        async for ev in gen:
            if ev["type"] == kind:
                break
        await gen.aclose()

    def idle(s) -> bool:
        st = s.stats()
        return st["num_running"] == st["num_waiting"] == 0 and st["num_free_blocks"] == st["num_blocks"]

    async def settled(deadline_s: float = 30.0) -> None:
        """The closed stream's inner generators finish on the loop and abort the stages; the engines' threads
        take the aborts in their own turn."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and not (len(aborted) == 3 and idle(thinker) and idle(talker)
                                              and t2w.stats()["active_requests"] == 0):
            await asyncio.sleep(0.02)

    thinker, talker, t2w = (omni.stage(s) for s in ("thinker", "talker", "token2wav"))
    for kind in ("text", "audio"):
        aborted.clear()
        omni._run(leave_at(kind, f"cancel-{kind}"))
        omni._run(settled())
        assert sorted(aborted) == [f"cancel-{kind}-{i}" for i in range(3)]
        for s in (thinker, talker):
            st = s.stats()
            assert st["num_running"] == st["num_waiting"] == 0 and st["num_free_blocks"] == st["num_blocks"], st
        assert t2w.stats()["active_requests"] == 0 and not t2w._feeds and not talker._feeds
    out = omni.generate("omni", PROMPT, audio={"voice": "Chelsie"}, use_tqdm=False, **SPEECH)
    assert out.stages[1]["num_codes"] == TALKER_NEW


def _backends(omni, pipe):
    return {s.stage: omni._backend(s.stage) for s in pipe.steps}


def test_talker_runs_while_the_thinker_decodes(omni):
    """Streamed hand-off: the talker's first codes come before the thinker's last token."""
    pipe, kinds = omni.config.pipelines["omni"], omni._kinds()
    backends = _backends(omni, pipe)
    times: dict = {}
    thinker_generate = backends["thinker"].generate

    async def thinker(req):
        async for d in thinker_generate(req):
            times["thinker_last"] = time.perf_counter()
            yield d

    backends["thinker"].generate = thinker
    talker_feed = backends["token2wav"].feed

    async def first_codes(rid, codes, finished):
        times.setdefault("first_codes", time.perf_counter())
        await talker_feed(rid, codes, finished)

    backends["token2wav"].feed = first_codes
    args = StageArgs.from_kwargs(SPEECH | {"max_tokens": 40})
    args.validate("omni", pipe, kinds)

    async def run():
        return [ev async for ev in run_pipeline(pipe, backends, kinds, PROMPT, "overlap-1", args,
                                                audio={"voice": "Chelsie"})]

    events = omni._run(run())
    assert events[-1]["stages"][0]["hidden_states"] == "streamed"
    assert times["first_codes"] < times["thinker_last"]


def test_thinker_without_streamed_states_falls_back(omni):
    """A thinker stage whose deltas carry no hidden states: the talker starts after it, from one encode of the
    prompt and the fed tokens, and makes the same codes and audio."""
    pipe, kinds = omni.config.pipelines["omni"], omni._kinds()
    backends = _backends(omni, pipe)
    generate = backends["thinker"].generate

    async def no_rows(req):
        async for d in generate(req):
            yield {k: v for k, v in d.items() if k not in ("hidden_states", "prompt_positions", "rope_delta")}

    backends["thinker"].generate = no_rows
    args = StageArgs.from_kwargs(SPEECH)
    args.validate("omni", pipe, kinds)
    streamed = omni.generate("omni", PROMPT, audio={"voice": "Chelsie"}, use_tqdm=False, **SPEECH)
    want = _last_codes(omni)[0]

    async def run():
        return [ev async for ev in run_pipeline(pipe, backends, kinds, PROMPT, "fallback-1", args,
                                                audio={"voice": "Chelsie"})]

    result = omni._run(run())[-1]
    assert result["stages"][0]["hidden_states"] == "encoded after the thinker"
    assert _last_codes(omni)[0] == want
    assert np.abs(result["audio"]["samples"] - streamed.audio).max() < 1e-5


def test_bad_speech_stage_args_are_refused_before_any_stage_runs(omni):
    before = omni.stage("thinker").stats()["steps"]
    for stage_args, param in (({"talker": {"stop": ["x"]}}, "stage_args.talker.stop"),
                              ({"talker": {"system_prompt": "hi"}}, "stage_args.talker.system_prompt"),
                              ({"token2wav": {"num_inference_steps": 1}}, "stage_args.token2wav.num_inference_steps"),
                              ({"token2wav": {"size": "64x64"}}, "stage_args.token2wav.height")):
        with pytest.raises(InvalidRequestError) as e:
            omni.generate("omni", PROMPT, audio={"voice": "Chelsie"}, use_tqdm=False, stage_args=stage_args)
        assert e.value.param == param
    assert omni.stage("thinker").stats()["steps"] == before


def test_a_failing_stage_aborts_the_others(omni):
    """token2wav fails after its first chunk: the error reaches the caller, the thinker's and talker's requests
    are aborted, and the engines go on."""
    from omni_ray.errors import EngineError

    pipe, kinds = omni.config.pipelines["omni"], omni._kinds()
    backends = _backends(omni, pipe)
    generate = backends["token2wav"].generate

    async def failing(req):
        async for d in generate(req):
            yield d
            raise EngineError("token2wav broke")

    backends["token2wav"].generate = failing
    aborted = []
    for b in backends.values():
        b.abort = (lambda f: lambda rid: (aborted.append(rid), f(rid)))(b.abort)
    args = StageArgs.from_kwargs(SPEECH | {"max_tokens": 40})
    args.validate("omni", pipe, kinds)

    async def run():
        return [ev async for ev in run_pipeline(pipe, backends, kinds, PROMPT, "fail-1", args,
                                                audio={"voice": "Chelsie"})]

    with pytest.raises(EngineError, match="token2wav broke"):
        omni._run(run())
    assert sorted(aborted) == [f"fail-1-{i}" for i in range(3)]
    omni._run(asyncio.sleep(0.05))
    for s in (omni.stage("thinker"), omni.stage("talker")):
        st = s.stats()
        assert st["num_running"] == st["num_waiting"] == 0
    assert omni.generate("omni", PROMPT, audio={"voice": "Chelsie"}, use_tqdm=False, **SPEECH).stages[1][
        "num_codes"] == TALKER_NEW


@pytest.mark.gpu
@pytest.mark.parametrize("streams", [False, True], ids=["default-stream", "engine-streams"])
def test_speech_on_cuda_equals_transformers(ckpt, reference, streams):
    """On CUDA (float32 thinker and talker with their CUDA graphs, token2wav in float32): the reference's thinker
    tokens and talker codes, the waveform within the chunking bound, and two requests batched as alone; the same
    with each engine on a CUDA stream of its own (``cuda_stream``)."""
    tokens, codes, wav = reference
    cfg = speech_config(str(ckpt), "cuda")
    for stage in cfg["stages"].values():
        stage["engine"]["cuda_stream"] = streams
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False          # float32 convolutions (torch's default lets cuDNN use TF32)
    try:
        _speech_on_cuda(cfg, tokens, codes, wav)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _speech_on_cuda(cfg, tokens, codes, wav):
    with OmniLLM(cfg) as o:
        record_codes(o)
        out = o.generate("omni", PROMPT, audio={"voice": "Chelsie"}, use_tqdm=False, **SPEECH)
        assert out.text == o.stage("thinker").tokenizer.decode(tokens)
        assert _last_codes(o) == [codes] and out.stages[0]["hidden_states"] == "streamed"
        _close(out.audio, wav, chunks=2)
        both = o.generate("omni", [PROMPT, "The lighthouse"], audio={"voice": "Chelsie"}, use_tqdm=False, **SPEECH)
        assert both[0].text == out.text and np.abs(both[0].audio - out.audio).max() < 1e-4
        assert o.stage("talker").stats()["max_batch_size"] >= 2


def test_engine_trace_sees_every_engine_and_restores_them(omni):
    """benchmarks/speech_trace.py (``bench_omni_speech.py --timeline``): one request's steps on the thinker, the
    talker, token2wav's DiT engine and its vocoder, stamped in order; the engines' methods back as they were."""
    from benchmarks.speech_trace import EngineTrace
    from omni_ray.ar.engine.engine_core import CoreLoop
    from omni_ray.dit.engine import DiTEngine

    step, dit_step = CoreLoop.step, DiTEngine.step
    with EngineTrace() as trace:
        t0 = time.perf_counter()
        out = omni.generate("omni", PROMPT, audio={"voice": "Chelsie"}, use_tqdm=False, **SPEECH)
        t1 = time.perf_counter()
    assert CoreLoop.step is step and DiTEngine.step is dit_step
    summary = trace.summary(t0, t1)
    engines = summary["engines"]
    assert set(engines) == {"thinker", "talker", "dit", "vocoder"}, engines
    assert engines["talker"]["steps"] >= out.stages[1]["num_codes"] // 8 and engines["dit"]["steps"] >= 1
    talker = engines["talker"]                          # host gaps between one engine's steps: >= 0, below its span
    assert 0 <= talker["gap_p50_ms"] <= 1e3 * (t1 - t0) and "gpu_p50_ms" not in talker   # CUDA events: asked for
    after = summary["talker_after_thinker"]             # the talker's steps once the thinker's last one ended
    assert after["steps"] >= 1 and after["codes"] >= after["steps"] and 0 <= after["gap_ms"] <= after["span_ms"]
    assert 0 <= after["solo_steps"] <= after["steps"]   # steps with no window work beside them, and their pace
    assert (after["solo_ms_per_code"] is None) == (after["solo_steps"] == 0)
    spans = summary["dit_and_vocoder"]
    assert [s["start_ms"] for s in spans] == sorted(s["start_ms"] for s in spans)
    assert all(0 <= s["start_ms"] and s["ms"] > 0 for s in spans) and spans[-1]["engine"] == "vocoder"


def test_a_finished_windows_vocoder_runs_before_the_next_ode(omni):
    """token2wav's DiT engine lets a finished window's stage queue its vocoder batch before the next engine step:
    the first audio does not wait behind the next window's whole ODE (AsyncDiTEngine's consumer turns)."""
    from benchmarks.speech_trace import EngineTrace

    with EngineTrace() as trace:
        t0 = time.perf_counter()
        omni.generate("omni", PROMPT, audio={"voice": "Chelsie"}, use_tqdm=False, **SPEECH)
        spans = trace.summary(t0, time.perf_counter())["dit_and_vocoder"]
    dit = [s["start_ms"] for s in spans if s["engine"] == "dit"]
    voc = [s["start_ms"] for s in spans if s["engine"] == "vocoder"]
    assert dit and voc and voc[0] > dit[0]
    if len(dit) > 1:
        assert voc[0] < dit[1], spans


def test_playback_figures_of_streamed_pieces():
    """benchmarks/speech_timing.py: a player's wait after the first piece, and the earliest start with no wait."""
    from benchmarks.speech_timing import playback_stall, smooth_start

    pieces = [(0.27, 0.04), (0.52, 0.48), (0.67, 0.72), (0.90, 0.72)]    # (arrival s, audio s): a small first piece
    assert abs(playback_stall(0.27, pieces) - (0.52 - 0.31)) < 1e-9      # waits for the second piece only
    assert abs(smooth_start(pieces) - 0.48) < 1e-9                        # the second piece arrives 0.04 s in
    assert smooth_start([(0.1, 1.0), (0.5, 1.0)]) == 0.1                  # every piece in time: the first arrival
    late = [(0.1, 0.2), (0.9, 1.0)]
    assert abs(smooth_start(late) - 0.7) < 1e-9 and abs(playback_stall(0.1, late) - 0.6) < 1e-9
