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


@pytest.fixture(scope="module")
def omni(ckpt):
    path = str(ckpt)
    ar = {"device": "cpu", "enforce_eager": True, "cache": {"num_blocks": 64},
          "scheduler": {"max_num_batched_tokens": 1024, "max_num_seqs": 4, "max_model_len": 1024}}
    cfg = {"stages": {"thinker": {"kind": "ar", "engine": {"model": {"path": path}} | ar},
                      "talker": {"kind": "ar", "engine": {"model": {"path": path, "submodel": "talker"}} | ar},
                      "token2wav": {"kind": "dit", "engine": {"model": {"path": path}, "device": "cpu"}}},
           "pipelines": {"omni": {"graph": {"model": "thinker",
                                            "stages": {"talker": "talker", "token2wav": "token2wav"}}},
                         "text": {"steps": [{"stage": "thinker"}]}}}
    with OmniLLM(cfg) as o:
        o.codes = {}
        talker = o.stage("talker")
        generate = talker.generate

        async def recorded(req):                          # the codec tokens each talker request yields
            async for d in generate(req):
                o.codes.setdefault(req.request_id, []).extend(d["codes"])
                yield d

        talker.generate = recorded
        yield o


def _last_codes(omni, n=1):
    return list(omni.codes.values())[-n:]


@pytest.fixture(scope="module")
def reference(ckpt, omni):
    """transformers' whole model: (thinker tokens, talker codes, waveform) of PROMPT under the chat template."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    from omni_ray.stages.ar import render_chat

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids = render_chat(omni.stage("thinker").tokenizer, [{"role": "user", "content": PROMPT}])
    got = {}
    talker_generate = model.talker.generate

    def talker(**kw):
        out = talker_generate(**kw)
        got["codes"] = out[0, kw["input_ids"].shape[1]:].tolist()
        return out

    def seed(*_):                                               # the noise: drawn right after this
        torch.manual_seed(SEED)

    tk = model.config.talker_config
    codec = model.talker.get_input_embeddings().weight

    def prompt_rows(_mod, args, kw):
        """transformers >= 5.2x's generate drops an all-ones attention mask, and the talker's forward only adds
        the codec pad / start embeddings to its last two prompt rows (its prompt set-up) when it gets a mask:
        done here in that case, as the model (and the original Qwen code) defines the prompt."""
        e = kw.get("inputs_embeds")
        if e is not None and kw.get("attention_mask") is None and e.shape[1] == len(ids) + 2:
            e = e.clone()
            e[:, -1] += codec[tk.tts_codec_start_token_id]
            e[:, -2] += codec[tk.tts_codec_pad_token_id]
            kw = kw | {"inputs_embeds": e}
        return args, kw

    model.talker.generate = talker
    hooks = [model.token2wav.register_forward_pre_hook(seed),
             model.talker.register_forward_pre_hook(prompt_rows, with_kwargs=True)]
    try:
        with torch.no_grad():
            seq, wav = model.generate(torch.tensor([ids]), speaker="Chelsie", thinker_max_new_tokens=THINKER_NEW,
                                      thinker_min_new_tokens=THINKER_NEW, thinker_do_sample=False,
                                      talker_do_sample=False, talker_max_new_tokens=TALKER_NEW,
                                      talker_eos_token_id=[tk.tts_codec_pad_token_id, tk.tts_codec_end_token_id],
                                      token2wav_num_steps=STEPS)
    finally:
        for h in hooks:
            h.remove()
        del model.talker.generate
    stops = {tk.tts_codec_pad_token_id, tk.tts_codec_end_token_id}
    codes = got["codes"]
    codes = codes[:next((i for i, c in enumerate(codes) if c in stops), len(codes))]
    return seq[0, len(ids):].tolist(), codes, wav.numpy()


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
    assert out.stages[2]["num_chunks"] == 2
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


def test_image_in_text_and_audio_out(omni):
    """A chat request with an image: the thinker's M-RoPE prompt goes to the talker; text as without audio."""
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 90, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe it."}]}]
    kw = dict(max_tokens=4, temperature=0, ignore_eos=True, stage_args={
        "talker": {"temperature": 0, "max_tokens": 12}, "token2wav": {"num_inference_steps": 2, "seed": 0}})
    out = omni.generate("omni", messages=msgs, audio={"voice": "Chelsie"}, use_tqdm=False, **kw)
    text = omni.generate("omni", messages=msgs, use_tqdm=False, **kw)
    assert out.text == text.text and text.audio is None
    assert out.usage["prompt_tokens"] > 20                  # the image's placeholder tokens
    n = out.stages[1]["num_codes"]
    assert n > 0 and out.audio.shape == (n * 2 * 240,) and np.isfinite(out.audio).all()


def test_text_only_request_skips_the_talker(omni):
    talker, t2w = omni.stage("talker").stats(), omni.stage("token2wav").stats()
    out = omni.generate("omni", PROMPT, max_tokens=4, temperature=0, use_tqdm=False)
    assert out.text and out.audio is None and [s["stage"] for s in out.stages] == ["thinker"]
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
        await asyncio.sleep(0.05)                              # the engines' loops take the aborts

    for kind in ("text", "audio"):
        aborted.clear()
        omni._run(leave_at(kind, f"cancel-{kind}"))
        assert sorted(aborted) == [f"cancel-{kind}-{i}" for i in range(3)]
        thinker, talker, t2w = (omni.stage(s) for s in ("thinker", "talker", "token2wav"))
        for s in (thinker, talker):
            st = s.stats()
            assert st["num_running"] == st["num_waiting"] == 0 and st["num_free_blocks"] == st["num_blocks"]
        assert t2w.stats()["active_requests"] == 0 and not t2w._feeds and not talker._feeds
    out = omni.generate("omni", PROMPT, audio={"voice": "Chelsie"}, use_tqdm=False, **SPEECH)
    assert out.stages[1]["num_codes"] == TALKER_NEW
