"""The Qwen2.5-Omni talker on the AR engine against transformers (float32, CPU, tiny:qwen2.5-omni).

transformers' ``Qwen2_5OmniForConditionalGeneration.generate(return_audio=True)`` runs once per module
(greedy thinker and talker; stopped right after the talker, token2wav is the t2w stage's business):
its thinker's embeddings and hidden states, the talker inputs it builds and the codec tokens its talker
produces are captured. omni-ray's talker, given the same thinker states (through ``TalkerInput``, as the
stage graph will hand them over), produces the same codec tokens; so it does from omni-ray's own thinker
(whose tokens and hidden states equal transformers'); a batch of two talker requests of different
lengths gives each the tokens it gets alone.
The talker samples with the reference's defaults but greedy (``talker_do_sample=False`` /
``temperature=0``): its repetition penalty (1.05) and suppressed codec start token apply as in the reference.
"""

import pytest
import torch

from omni_ray.ar.models.qwen2_5_omni_talker_inputs import TalkerInput, talker_sampling_params
from tests.ar.conftest import make_llm

THINKER_NEW = 6           # thinker tokens: 5 fed back (their states reach the talker), the last never fed
TALKER_NEW = 12           # past the thinker's reply: the text-end and text-pad rows are used too
PROMPT = [1, 20, 30, 40, 50, 2, 1, 60, 5]


class _Stop(Exception):
    """Raised after the talker: the reference's token2wav is not needed here."""


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2_5OmniForConditionalGeneration

    from omni_ray.testing import resolve_model

    path = resolve_model("tiny:qwen2.5-omni")
    return Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ref(hf_model):
    ids = torch.tensor([PROMPT])
    return _reference(hf_model, input_ids=ids, attention_mask=torch.ones_like(ids))


def _reference(model, thinker_new=THINKER_NEW, talker_new=TALKER_NEW, **inputs) -> dict:
    """transformers' run: thinker result, the talker's generate kwargs (cloned before its forward adds the
    codec embeddings in place) and its codec tokens."""
    got = {}
    thinker_generate, talker_generate = model.thinker.generate, model.talker.generate

    def thinker(**kw):
        got["thinker"] = thinker_generate(**kw)
        return got["thinker"]

    def talker(**kw):
        # transformers 5 passes the thinker's pixel_values on to the talker, whose generate refuses them
        # (it reads image_grid_thw only): dropped here, as the talker never uses them
        kw.pop("pixel_values", None)
        got["talker_kwargs"] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()}
        got["codes"] = talker_generate(**kw)[0, kw["input_ids"].shape[1]:].tolist()
        raise _Stop

    model.thinker.generate, model.talker.generate = thinker, talker
    tk = model.config.talker_config
    try:
        with pytest.raises(_Stop), torch.no_grad():
            model.generate(**inputs, speaker="Chelsie",
                           thinker_max_new_tokens=thinker_new, thinker_min_new_tokens=thinker_new,
                           thinker_do_sample=False, talker_do_sample=False, talker_max_new_tokens=talker_new,
                           talker_eos_token_id=[tk.tts_codec_pad_token_id, tk.tts_codec_end_token_id])
    finally:
        del model.thinker.generate, model.talker.generate          # the class methods again
    res = got["thinker"]
    got["thinker_ids"] = res.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    got["embeds"] = [h[0][0] for h in res.hidden_states]          # per forward: [n, E] input embeddings
    got["hidden"] = [h[-1][0] for h in res.hidden_states]         # ... and final hidden states
    got["table"] = model.thinker.get_input_embeddings().weight.detach()
    got["bos"] = model.speaker_map["Chelsie"]["bos_token"]
    return got


@pytest.fixture(scope="module")
def talker():
    return make_llm("tiny:qwen2.5-omni", submodel="talker")


def _greedy(llm, n=TALKER_NEW):
    return talker_sampling_params(llm.arch.talker, temperature=0.0, max_tokens=n)


def _talker_input(ref, tokens, prompt_rows=None) -> TalkerInput:
    """TalkerInput from transformers' thinker states (the first ``prompt_rows`` prompt positions only)."""
    n = prompt_rows or len(PROMPT)
    inp = TalkerInput.from_thinker(tokens, ref["table"], PROMPT[:n], ref["hidden"][0][:n], ref["bos"])
    for k in range(1, len(ref["hidden"])):                     # the fed thinker tokens, as they come
        inp.add_thinker_token(ref["thinker_ids"][k - 1], ref["hidden"][k][0])
    inp.finish()
    return inp


def test_talker_inputs_equal_transformers(ref, talker):
    """The prompt rows, token ids and per-step rows equal what transformers' generate builds."""
    kw = ref["talker_kwargs"]
    inp = _talker_input(ref, talker.arch.talker)
    assert inp.token_ids == kw["input_ids"][0].tolist()
    torch.testing.assert_close(inp.embeds.prompt, kw["inputs_embeds"][0], rtol=0, atol=0)
    reply = kw["thinker_reply_part"][0]                              # [fed - 1 + eos + pad, E]
    steps = torch.stack([inp.embeds.step(k) for k in range(reply.shape[0] + 3)])
    torch.testing.assert_close(steps[:reply.shape[0]], reply, rtol=0, atol=0)
    torch.testing.assert_close(steps[reply.shape[0]:], reply[-1:].expand(3, -1), rtol=0, atol=0)   # pad forever


def test_talker_codec_tokens_equal_transformers(ref, talker):
    assert len(ref["codes"]) == TALKER_NEW
    out = talker.generate(_talker_input(ref, talker.arch.talker).prompt(), _greedy(talker), use_tqdm=False)
    assert out[0]["token_ids"] == ref["codes"]


def test_talker_from_omni_ray_thinker(ref, talker):
    """omni-ray's thinker: the same tokens and hidden states as transformers'; the talker on its states
    gives the reference's codec tokens."""
    from omni_ray.ar import SamplingParams

    thinker = make_llm("tiny:qwen2.5-omni")
    out = thinker.generate([PROMPT], SamplingParams(temperature=0, max_tokens=THINKER_NEW, ignore_eos=True),
                           use_tqdm=False)[0]
    assert out["token_ids"] == ref["thinker_ids"]
    fed = out["token_ids"][:-1]                                   # the last token is never fed to the thinker
    hidden = thinker.encode([PROMPT + fed], layer=-1)[0]             # [L + fed, E], final normed
    torch.testing.assert_close(hidden, torch.cat(ref["hidden"]), rtol=1e-5, atol=1e-5)
    table = thinker.runner.model.embed_tokens.weight.detach()
    torch.testing.assert_close(table, ref["table"], rtol=0, atol=0)
    inp = TalkerInput.from_thinker(talker.arch.talker, table, PROMPT, hidden[:len(PROMPT)], ref["bos"])
    inp.add_thinker_token(fed, hidden[len(PROMPT):])
    inp.finish()
    got = talker.generate(inp.prompt(), _greedy(talker), use_tqdm=False)[0]["token_ids"]
    assert got == ref["codes"]


def test_talker_batched_equals_alone(ref, talker):
    """Two talker requests of different prompt lengths in one batch: each gets its tokens alone."""
    tokens = talker.arch.talker
    alone = [talker.generate(_talker_input(ref, tokens, n).prompt(), _greedy(talker, m), use_tqdm=False)[0]
             for n, m in ((len(PROMPT), TALKER_NEW), (4, TALKER_NEW - 3))]
    before = talker.stats.max_batch_size
    both = talker.generate([_talker_input(ref, tokens, n).prompt() for n in (len(PROMPT), 4)],
                           [_greedy(talker, TALKER_NEW), _greedy(talker, TALKER_NEW - 3)], use_tqdm=False)
    assert [o["token_ids"] for o in both] == [o["token_ids"] for o in alone]
    assert alone[0]["token_ids"] == ref["codes"]
    assert max(before, talker.stats.max_batch_size) >= 2


def test_talker_image_prompt_equal_transformers(hf_model, talker):
    """A thinker prompt with an image: the talker's M-RoPE positions (the thinker prompt's, from
    ``mrope_positions``, and two more) and zeroed placeholder embeddings give the reference's codec tokens."""
    from omni_ray.ar.models.loader import read_hf_config
    from omni_ray.ar.models.mrope import MRopeSpec, mrope_positions
    from omni_ray.testing import resolve_model
    from tests.ar.test_mm_encoders import _image, auto_processor

    path = resolve_model("tiny:qwen2.5-omni")
    proc = auto_processor(path)
    parts = [{"type": "image"}, {"type": "text", "text": "Describe it."}]
    text = proc.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=[_image(64, 90, 1)], return_tensors="pt")
    ref = _reference(hf_model, thinker_new=4, talker_new=8, **inputs)
    ids = inputs["input_ids"][0]
    cfg = read_hf_config(path)
    positions, delta = mrope_positions(ids, MRopeSpec.from_hf(cfg), inputs["image_grid_thw"])
    assert delta != 0                                                    # positions that 1-D would get wrong
    tokens = talker.arch.talker
    inp = TalkerInput.from_thinker(tokens, ref["table"], ids.tolist(), ref["hidden"][0], ref["bos"],
                                   media_token_ids=(cfg["thinker_config"]["image_token_index"],),
                                   positions=positions, rope_delta=delta)
    for k in range(1, len(ref["hidden"])):
        inp.add_thinker_token(ref["thinker_ids"][k - 1], ref["hidden"][k][0])
    inp.finish()
    kw = ref["talker_kwargs"]
    torch.testing.assert_close(inp.embeds.prompt, kw["inputs_embeds"][0], rtol=0, atol=0)
    want, want_delta = hf_model.talker.get_rope_index(kw["input_text_ids"], kw["image_grid_thw"], None,
                                                      kw["attention_mask"])
    assert torch.equal(inp.embeds.positions, want[:, 0]) and inp.embeds.rope_delta == int(want_delta)
    got = talker.generate(inp.prompt(), _greedy(talker, 8), use_tqdm=False)[0]["token_ids"]
    assert got == ref["codes"]


@pytest.mark.gpu
def test_talker_on_cuda_equals_transformers(ref):
    """On CUDA (float32; Triton attention over the paged cache, decode steps in the decode graphs with their
    step rows and the repetition penalty on the device): the reference's codec tokens, alone and batched."""
    llm = make_llm("tiny:qwen2.5-omni", submodel="talker", device="cuda", dtype="float32", enforce_eager=False)
    tokens = llm.arch.talker
    outs = llm.generate([_talker_input(ref, tokens).prompt(), _talker_input(ref, tokens, 4).prompt()],
                        [_greedy(llm), _greedy(llm, TALKER_NEW - 3)], use_tqdm=False)
    assert outs[0]["token_ids"] == ref["codes"]
    alone = llm.generate(_talker_input(ref, tokens, 4).prompt(), _greedy(llm, TALKER_NEW - 3), use_tqdm=False)
    assert outs[1]["token_ids"] == alone[0]["token_ids"]
