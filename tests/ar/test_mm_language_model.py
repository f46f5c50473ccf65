"""The language models of Qwen2.5-VL and of the Qwen2.5-Omni thinker in the AR engine (float32, CPU):
text-only generation equal to transformers' whole models, M-RoPE / TMRoPE positions equal to
transformers' ``get_rope_index``, and prompts with images / audio (our encoders' outputs spliced at
the placeholder tokens, M-RoPE positions) giving transformers' logits and greedy continuations."""

import json

import pytest
import torch

from omni_ray.ar import SamplingParams
from omni_ray.ar.layers.attention import AttnMetadata
from omni_ray.ar.models import ArchConfig, DecoderForCausalLM
from omni_ray.ar.models.loader import load_weights, read_hf_config
from omni_ray.ar.models.mrope import MRopeSpec, mrope_positions
from omni_ray.ar.models.qwen2_5_omni_audio import load_audio_tower
from omni_ray.ar.models.qwen2_5_vl_vision import load_vision_tower
from omni_ray.errors import ConfigError
from omni_ray.testing import resolve_model
from omni_ray.testing.tiny_mm import _spread_encoder_weights
from tests.ar.conftest import PROMPTS, make_llm
from tests.ar.test_mm_encoders import _image, _wave, auto_processor

ATOL = RTOL = 1e-4
N_NEW = 12


@pytest.fixture(scope="module")
def vl():
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = resolve_model("tiny:qwen2.5-vl")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return dict(path=path, hf=hf, proc=auto_processor(path), spec=MRopeSpec.from_hf(read_hf_config(path)))


@pytest.fixture(scope="module")
def omni():
    from transformers import Qwen2_5OmniForConditionalGeneration

    path = resolve_model("tiny:qwen2.5-omni")
    hf = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return dict(path=path, hf=hf, proc=auto_processor(path), spec=MRopeSpec.from_hf(read_hf_config(path)))


# ------------------------------------------------------------------ text only, through LLM


def _hf_greedy(hf, ids: torch.Tensor, **kw) -> list[int]:
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                      do_sample=False, **kw)
    out = out[0] if isinstance(out, tuple) else out
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["vl", "omni"])
def test_text_only_generation_equals_transformers(name, request):
    """LLM("tiny:qwen2.5-vl" / "tiny:qwen2.5-omni"): greedy tokens of a batch of prompts (prefix caching
    on, the prompts sharing a cached prefix the second time) equal the whole transformers model's."""
    mm = request.getfixturevalue(name)
    llm = make_llm(f"tiny:qwen2.5-{name}", enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    prompts = PROMPTS + [PROMPTS[3] + " sea"]                      # shares 1+ cached blocks with PROMPTS[3]
    first = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts, params, use_tqdm=False)           # whole prompts from the prefix cache
    # Omni's generate runs the thinker with thinker_* settings (its own default is 1024 new tokens)
    kw = dict(generation_mode="text", thinker_max_new_tokens=N_NEW, thinker_min_new_tokens=N_NEW) \
        if name == "omni" else {}
    for prompt, a, b in zip(prompts, first, again):
        ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
        ref = _hf_greedy(mm["hf"], ids, **kw)
        assert a["token_ids"] == ref, prompt
        assert b["token_ids"] == ref, prompt


# ------------------------------------------------------------------ M-RoPE positions


def _vl_reference(vl, ids, images=None, videos=None, seconds=None):
    """transformers' Qwen2.5-VL positions [3, T] and delta (token types as its processor marks them)."""
    cfg = vl["hf"].config
    types = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
    pos, delta = vl["hf"].model.get_rope_index(ids[None], types[None], image_grid_thw=images, video_grid_thw=videos,
                                               second_per_grid_ts=seconds)
    return pos[:, 0], int(delta)


def _vl_inputs(vl, parts, images):
    msg = [{"role": "user", "content": parts}]
    text = vl["proc"].apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
    return vl["proc"](text=[text], images=images or None, return_tensors="pt")


def _assert_positions(vl_or_omni, ids, ref, **kw):
    got, delta = mrope_positions(ids, vl_or_omni["spec"], **kw)
    assert got.shape == (3, len(ids))
    assert torch.equal(got, ref[0]), (got, ref[0])
    assert delta == ref[1]


@pytest.mark.parametrize("case", ["one", "two_sizes", "interleaved"])
def test_vl_image_positions_equal_get_rope_index(vl, case):
    img = {"type": "image"}
    parts, images = {
        "one": ([img, {"type": "text", "text": "Describe."}], [_image(100, 150, 0)]),
        "two_sizes": ([img, img, {"type": "text", "text": "Compare."}], [_image(224, 168, 1), _image(60, 90, 2)]),
        "interleaved": ([{"type": "text", "text": "Look at"}, img, {"type": "text", "text": "and then"}, img,
                         {"type": "text", "text": "please."}], [_image(37, 231, 3), _image(100, 150, 4)]),
    }[case]
    out = _vl_inputs(vl, parts, images)
    ids, grid = out["input_ids"][0], out["image_grid_thw"]
    ref = _vl_reference(vl, ids, images=grid)
    assert ref[1] < 0                                             # images do shift what follows
    _assert_positions(vl, ids, ref, image_grid_thw=grid)
    if case == "two_sizes":
        assert grid[0].tolist() != grid[1].tolist()


def _video_prompt(tokens: dict, n_video: int, image_tokens: int = 0) -> torch.Tensor:
    """text <vs> [image pads <ve> text <vs>] video pads <ve> text, as token ids."""
    ids = [3, 4, 5, tokens["start"]]
    if image_tokens:
        ids += [tokens["image"]] * image_tokens + [tokens["end"], 6, tokens["start"]]
    return torch.tensor(ids + [tokens["video"]] * n_video + [tokens["end"], 6, 7, 8])


def test_vl_video_positions_equal_get_rope_index(vl):
    """A video grid (2 temporal steps, second_per_grid_ts 0.5 and 1.0) after an image: transformers'
    positions, including the temporal scaling by tokens_per_second."""
    cfg = vl["hf"].config
    tokens = dict(start=cfg.vision_start_token_id, end=cfg.vision_end_token_id, image=cfg.image_token_id,
                  video=cfg.video_token_id)
    images, videos = torch.tensor([[1, 4, 6]]), torch.tensor([[2, 8, 12]])
    for seconds in (0.5, 1.0):
        ids = _video_prompt(tokens, 2 * 4 * 6, image_tokens=6)
        spg = torch.tensor([seconds])
        ref = _vl_reference(vl, ids, images=images, videos=videos, seconds=spg)
        assert len(set(ref[0][0][ids == cfg.video_token_id].tolist())) == 2       # two temporal positions
        _assert_positions(vl, ids, ref, image_grid_thw=images, video_grid_thw=videos, second_per_grid_ts=spg)


def test_vl_long_video_text_continues_after_its_last_position(vl):
    """A video whose temporal positions run past its spatial ones: the text after it continues one
    past the video's largest position (Qwen2.5-VL's original rule, vLLM's; transformers 5.25 restarts
    at the spatial extent instead), and decode continues from the same place (rope_delta)."""
    cfg = vl["hf"].config
    tokens = dict(start=cfg.vision_start_token_id, end=cfg.vision_end_token_id, video=cfg.video_token_id)
    ids = _video_prompt(tokens, 4 * 2 * 2)                         # grid (4, 4, 4): 4 steps of 2x2 tokens
    pos, delta = mrope_positions(ids, vl["spec"], video_grid_thw=torch.tensor([[4, 4, 4]]),
                                 second_per_grid_ts=torch.tensor([2.0]))
    step = int(2.0 * vl["hf"].config.vision_config.tokens_per_second)   # 8 positions per temporal step
    first = 4                                                       # 3 text tokens + <vision_start>
    video = pos[:, first:first + 16]
    assert video[0].tolist() == [first + step * t for t in range(4) for _ in range(4)]
    assert video[1].tolist() == [first + h for _ in range(4) for h in (0, 0, 1, 1)]
    assert video[2].tolist() == [first + w for _ in range(4) for w in (0, 1, 0, 1)]
    after = first + 3 * step + 1                                    # <vision_end>
    assert pos[:, first + 16].tolist() == [after] * 3
    assert pos[:, -1].tolist() == [after + 3] * 3                    # <vision_end> 6 7 8
    assert delta == after + 3 + 1 - len(ids)


def _omni_reference(omni, ids, images=None, videos=None, audio_lens=None, seconds=None, in_video=False):
    pos, delta = omni["hf"].thinker.get_rope_index(
        ids[None], image_grid_thw=images, video_grid_thw=videos, attention_mask=torch.ones_like(ids)[None],
        use_audio_in_video=in_video, audio_seqlens=audio_lens, second_per_grids=seconds)
    return pos[:, 0], int(delta)


def _omni_inputs(omni, parts, images=None, audios=None):
    msg = [{"role": "user", "content": parts}]
    text = omni["proc"].apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
    return omni["proc"](text=[text], images=images, audio=audios, return_tensors="pt")


@pytest.mark.parametrize("case", ["audio", "image_audio", "two_audios_image"])
def test_omni_positions_equal_get_rope_index(omni, case):
    """TMRoPE of the Omni thinker: audio tokens count up like text (from their own start), image grids
    take (t * position_id_per_seconds, h, w); transformers' positions for each layout."""
    aud, img, txt = {"type": "audio"}, {"type": "image"}, {"type": "text", "text": "What is it?"}
    parts, images, audios = {
        "audio": ([aud, txt], None, [_wave(16000, 0)]),
        "image_audio": ([img, aud, txt], [_image(100, 150, 1)], [_wave(9000, 2)]),
        "two_audios_image": ([aud, txt, img, aud], [_image(37, 231, 3)], [_wave(5230, 4), _wave(16000, 5)]),
    }[case]
    out = _omni_inputs(omni, parts, images, audios)
    ids, grid = out["input_ids"][0], out.get("image_grid_thw")
    if grid is None:        # transformers takes a text-only path without grids: positions 0..T-1
        ref = (torch.arange(len(ids)).expand(3, -1), 0)
    else:
        ref = _omni_reference(omni, ids, images=grid, audio_lens=out["feature_attention_mask"].sum(-1))
    _assert_positions(omni, ids, ref, image_grid_thw=grid)


def test_omni_video_and_audio_in_video_positions(omni):
    """Omni video grids (second_per_grids) with and without their audio interleaved (use_audio_in_video:
    chunks of seconds_per_chunk, the two start / end tokens sharing a position)."""
    c = omni["hf"].config.thinker_config
    vbos, veos = c.vision_start_token_id, c.vision_end_token_id
    abos, aeos = c.audio_start_token_id, c.audio_end_token_id
    grid, seconds = torch.tensor([[6, 4, 4]]), torch.tensor([1.0])       # 6 steps of 2x2 tokens, 25 positions each
    video = [c.video_token_index] * 24
    ids = torch.tensor([3, 4, vbos] + video + [veos, 5, 6])
    ref = _omni_reference(omni, ids, videos=grid, seconds=seconds)
    _assert_positions(omni, ids, ref, video_grid_thw=grid, second_per_grid_ts=seconds)

    feature_len = torch.tensor([200])                                     # -> 50 audio tokens
    n_audio = 50
    # interleaved as the processor writes them: per 2-second chunk, its video tokens then its audio tokens
    body = []
    for j in range(3):
        body += video[:8] + [c.audio_token_index] * (25 if j < 2 else 0)
    body = body[:24 + n_audio] if len(body) >= 24 + n_audio else body
    assert body.count(c.audio_token_index) == n_audio and body.count(c.video_token_index) == 24
    ids = torch.tensor([3, 4, vbos, abos] + body + [aeos, veos, 5, 6])
    ref = _omni_reference(omni, ids, videos=grid, audio_lens=feature_len, seconds=seconds, in_video=True)
    _assert_positions(omni, ids, ref, video_grid_thw=grid, second_per_grid_ts=seconds, use_audio_in_video=True)
    assert ref[0][0, 3] == ref[0][0, 2] and ref[0][0, -4] == ref[0][0, -3]   # shared start / end positions


def test_layouts_that_do_not_fit_their_grids_are_request_errors(vl, omni):
    from omni_ray.errors import InvalidRequestError

    ids = torch.tensor([3, 7] + [10] * 6 + [8, 4])
    with pytest.raises(InvalidRequestError, match="image placeholder run of 6 tokens, its grid gives 12"):
        mrope_positions(ids, vl["spec"], image_grid_thw=torch.tensor([[1, 6, 8]]))
    with pytest.raises(InvalidRequestError, match="more placeholder runs"):
        mrope_positions(ids, vl["spec"])
    c = omni["hf"].config.thinker_config
    ids = torch.tensor([c.video_token_index] * 4 + [c.audio_token_index] * 3 + [5])     # no start/end tokens
    with pytest.raises(InvalidRequestError, match="two start and two end tokens"):
        mrope_positions(ids, omni["spec"], video_grid_thw=torch.tensor([[1, 4, 4]]), use_audio_in_video=True)


# ------------------------------------------------------------------ the decoder on media prompts


def _load(path, device: str = "cpu", backend: str = "torch") -> DecoderForCausalLM:
    from omni_ray.ar.layers.ops import Ops

    ops = Ops().for_cuda() if backend != "torch" else Ops()
    with torch.device(device):
        model = DecoderForCausalLM(ArchConfig.from_hf(read_hf_config(path)), backend=backend, ops=ops).eval()
    load_weights(model, path)
    return model


def _attach_cache(model: DecoderForCausalLM, tokens: int, block: int = 16) -> int:
    blocks = -(-tokens // block)
    dev = model.rope_cos.device
    for layer in model.layers:
        a = layer.self_attn.attn
        a.k_cache = torch.zeros(blocks, block, a.n_kv_heads, a.head_dim, device=dev)    # [blocks, block, Hkv, D]
        a.v_cache = torch.zeros_like(a.k_cache)
    return blocks


def _meta(start: int, n: int, blocks: int, device="cpu") -> AttnMetadata:
    """One sequence: tokens start..start+n-1 (cache slots = sequence indices), n == 1 a decode."""
    end = start + n
    i32 = dict(dtype=torch.int32, device=device)
    return AttnMetadata(
        slot_mapping=torch.arange(start, end, device=device), context_lens=torch.tensor([end], **i32),
        block_tables=torch.arange(blocks, **i32)[None], cu_seqlens_q=torch.tensor([0, n], **i32),
        num_decodes=int(start > 0 and n == 1), max_query_len=n, max_context_len=end, q_lens=[n], ctx_lens=[end])


@torch.no_grad()
def _prompt_and_greedy(model, ids, positions, embeds, steps: int):
    """Prefill logits [T, V], then ``steps`` greedy decode steps at 1-D positions i + rope_delta:
    (prefill logits, tokens [steps], logits of each step [steps, V]), on the model's device."""
    dev = model.rope_cos.device
    pos, delta = positions
    blocks = _attach_cache(model, len(ids) + steps)
    if embeds is not None:
        embeds = (embeds[0].to(dev), embeds[1].to(dev))
    hidden, _ = model(ids.to(dev), pos.to(dev), _meta(0, len(ids), blocks, dev), embeds=embeds)
    logits = model.compute_logits(hidden)                            # [T, V]
    tokens, step_logits, last = [], [], logits[-1]
    for i in range(steps):
        tok = int(last.argmax())
        tokens.append(tok)
        if i + 1 == steps:
            break
        n = len(ids) + i
        h, _ = model(torch.tensor([tok], device=dev), torch.tensor([n + delta], device=dev), _meta(n, 1, blocks, dev))
        last = model.compute_logits(h)[0]
        step_logits.append(last)
    return logits, tokens, torch.stack(step_logits) if step_logits else None


def _rows(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    return (ids == token_id).nonzero().flatten()                      # [M]


def _check_against(ref_logits, ref_gen, ours):
    logits, tokens, steps = ours
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=RTOL)
    assert tokens == ref_gen.sequences[0, -len(tokens):].tolist()
    torch.testing.assert_close(steps, torch.stack([x[0] for x in ref_gen.logits[1:len(tokens)]]), atol=ATOL, rtol=RTOL)


def test_vl_image_prompt_logits_equal_transformers(vl):
    """Two images of different sizes in text: the vision tower's rows spliced at the image pads,
    M-RoPE positions; the prompt's logits and a greedy continuation (decode at i + rope_delta) equal
    transformers' forward and generate."""
    img = {"type": "image"}
    out = _vl_inputs(vl, [{"type": "text", "text": "See"}, img, {"type": "text", "text": "and"}, img],
                      [_image(100, 150, 5), _image(60, 90, 6)])
    ids, grid = out["input_ids"][0], out["image_grid_thw"]
    with torch.no_grad():
        ref = vl["hf"](**out).logits[0]
        gen = vl["hf"].generate(**out, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        embeds = load_vision_tower(vl["path"])(out["pixel_values"], grid)       # [M, hidden]
    rows = _rows(ids, vl["hf"].config.image_token_id)
    ours = _prompt_and_greedy(_load(vl["path"]), ids, mrope_positions(ids, vl["spec"], grid), (rows, embeds), 4)
    _check_against(ref, gen, ours)
    # without the image rows, or with 1-D positions, the logits differ: both inputs matter
    plain = _prompt_and_greedy(_load(vl["path"]), ids, (torch.arange(len(ids)), 0), (rows, embeds), 1)[0]
    assert not torch.allclose(plain, ref, atol=1e-3)


def test_omni_thinker_image_and_audio_logits_equal_transformers(omni):
    """The Omni thinker on an image + audio prompt: both towers' rows spliced, TMRoPE positions."""
    out = _omni_inputs(omni, [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Tell me."}],
                       [_image(100, 150, 7)], [_wave(16000, 8)])
    ids, grid = out["input_ids"][0], out["image_grid_thw"]
    thinker, cfg = omni["hf"].thinker, omni["hf"].config.thinker_config
    with torch.no_grad():
        ref = thinker(**out).logits[0]
        gen = thinker.generate(**out, max_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        image = load_vision_tower(omni["path"])(out["pixel_values"], grid)
        audio = load_audio_tower(omni["path"])(out["input_features"], out["feature_attention_mask"])
    rows = torch.cat([_rows(ids, cfg.image_token_index), _rows(ids, cfg.audio_token_index)])
    embeds = (rows, torch.cat([image, audio]))
    ours = _prompt_and_greedy(_load(omni["path"]), ids, mrope_positions(ids, omni["spec"], grid), embeds, 4)
    _check_against(ref, gen, ours)


# ------------------------------------------------------------------ other dimensions, key names


def _other_vl(path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(3)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=24, intermediate_size=32, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=48,
                           fullatt_block_indexes=[1], tokens_per_second=3),
        text_config=dict(vocab_size=1024, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 5000.0}),
        image_token_id=10, video_token_id=11, vision_start_token_id=7, vision_end_token_id=8)
    hf = Qwen2_5_VLForConditionalGeneration(config).eval()
    _spread_encoder_weights(hf, 3)
    hf.save_pretrained(path)
    return hf


def _other_thinker(path):
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(4)
    config = Qwen2_5OmniThinkerConfig(
        vision_config=dict(depth=2, hidden_size=24, intermediate_size=32, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=40,
                           fullatt_block_indexes=[0]),
        audio_config=dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, n_window=8, max_source_positions=64, output_dim=40),
        text_config=dict(vocab_size=1024, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=24, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 4, 6], "rope_theta": 20000.0}),
        audio_token_index=7, image_token_index=13, video_token_index=14, audio_start_token_id=8,
        audio_end_token_id=9, vision_start_token_id=11, vision_end_token_id=12, position_id_per_seconds=10)
    hf = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    _spread_encoder_weights(hf, 4)
    hf.save_pretrained(path)
    return hf


def test_other_dimensions_follow_the_config(tmp_path):
    """A Qwen2.5-VL with 3 heads of 16 and mrope_section [4, 2, 2], and an Omni thinker-only checkpoint
    (``model.*`` / ``lm_head`` keys) with head_dim 24 != hidden / heads and mrope_section [2, 4, 6]:
    image prompts (and audio for the thinker) give transformers' logits."""
    hf = _other_vl(tmp_path / "vl")
    ids = torch.tensor([3, 4, 7] + [10] * 12 + [8, 5, 6, 9])
    grid = torch.tensor([[1, 6, 8]])                                   # 3 x 4 merged tokens
    pixels = torch.randn(48, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid,
                 mm_token_type_ids=(ids == 10).long()[None]).logits[0]
        embeds = (_rows(ids, 10), load_vision_tower(tmp_path / "vl")(pixels, grid))
    spec = MRopeSpec.from_hf(read_hf_config(tmp_path / "vl"))
    model = _load(tmp_path / "vl")
    assert model.config.head_dim == 16 and model.config.mrope_section == [4, 2, 2]
    got = _prompt_and_greedy(model, ids, mrope_positions(ids, spec, grid), embeds, 1)[0]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)

    hf = _other_thinker(tmp_path / "thinker")
    mask = torch.ones(1, 100, dtype=torch.long)                       # 100 frames -> 25 audio tokens
    features = torch.randn(1, 128, 100, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([3, 11] + [13] * 12 + [12, 8] + [7] * 25 + [9, 5, 6])
    with torch.no_grad():
        ref = hf(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], pixel_values=pixels,
                 image_grid_thw=grid, input_features=features, feature_attention_mask=mask).logits[0]
        image = load_vision_tower(tmp_path / "thinker")(pixels, grid)
        audio = load_audio_tower(tmp_path / "thinker")(features, mask)
    spec = MRopeSpec.from_hf(read_hf_config(tmp_path / "thinker"))
    model = _load(tmp_path / "thinker")
    assert model.config.head_dim == 24 and model.config.mrope_section == [2, 4, 6]
    embeds = (torch.cat([_rows(ids, 13), _rows(ids, 7)]), torch.cat([image, audio]))
    got = _prompt_and_greedy(model, ids, mrope_positions(ids, spec, grid), embeds, 1)[0]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_key_names_and_skipped_tensors(vl, tmp_path):
    """transformers' in-memory names (``model.language_model.*``) load too; encoder / talker / token2wav
    tensors are skipped by name, while any other unknown tensor is still an error."""
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text((vl["path"] / "config.json").read_text())
    sd = {k: v.contiguous() for k, v in vl["hf"].state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in sd) and any(k.startswith("model.visual.") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    ours, ref = _load(tmp_path), _load(vl["path"])
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
    sd["talker.extra.weight"] = torch.zeros(2)                         # skipped on purpose
    save_file(sd, str(tmp_path / "model.safetensors"))
    _load(tmp_path)
    sd["model.language_model.stray.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="stray"):
        _load(tmp_path)


def test_config_mistakes_are_errors(vl, tmp_path):
    cfg = json.loads((vl["path"] / "config.json").read_text())
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    with pytest.raises(ConfigError, match="mrope_section"):
        ArchConfig.from_hf(cfg)
    cfg["text_config"]["head_dim"] = 32
    with pytest.raises(ConfigError, match="head_dim"):
        ArchConfig.from_hf(cfg)


def test_flat_transformers4_config_reads_the_same(vl):
    """Hub Qwen2.5-VL config.json files (transformers 4.x) are flat, with rope_scaling type "mrope"."""
    cfg = json.loads((vl["path"] / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    flat = dict(cfg, **text, rope_theta=rope["rope_theta"],
                rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    a, b = ArchConfig.from_hf(flat), ArchConfig.from_hf(json.loads((vl["path"] / "config.json").read_text()))
    assert a.mrope_section == b.mrope_section == [2, 3, 3]
    assert (a.hidden_size, a.head_dim, a.num_kv_heads, a.rms_norm_eps) == (b.hidden_size, b.head_dim,
                                                                           b.num_kv_heads, b.rms_norm_eps)
    model = DecoderForCausalLM(a)
    torch.testing.assert_close(model.rope_cos, DecoderForCausalLM(b).rope_cos)


def test_mrope_rotary_with_equal_rows_is_plain_rope(vl):
    """Text-only: three equal position rows give exactly the 1-D rotary (bit for bit), so text keeps
    its 1-D positions and batches with everything else."""
    model = _load(vl["path"])
    pos = torch.tensor([0, 5, 17, 300, 4000])
    _, cos1, sin1 = model.rope(pos)
    _, cos3, sin3 = model.rope(pos.expand(3, -1))
    assert torch.equal(cos1, cos3) and torch.equal(sin1, sin3)
    # different rows: frequencies of section i take row i % 3 ([2, 3, 3]: t t h h h w w w)
    p3 = torch.stack([pos, pos + 1, pos + 2])
    _, cos, _ = model.rope(p3)
    for j, row in enumerate([0, 0, 1, 1, 1, 2, 2, 2]):
        assert torch.equal(cos[:, j], model.rope_cos[p3[row], j])


# ------------------------------------------------------------------ CUDA: the fused Triton path


@pytest.mark.gpu
def test_fused_triton_path_takes_mrope_positions():
    """On CUDA (fused q/k/v + rotary + KV-store kernel, Triton paged attention) a prompt with image rows
    and [3, N] positions, then decode steps at 1-D positions i + rope_delta, equal the CPU torch path:
    the kernel reads per-token M-RoPE rows through positions 0..N-1, unchanged."""
    path = resolve_model("tiny:qwen2.5-vl")
    spec = MRopeSpec.from_hf(read_hf_config(path))
    ids = torch.tensor([3, 4, 7] + [10] * 12 + [8, 5, 6, 9, 12, 13])
    grid = torch.tensor([[1, 6, 8]])
    embeds = (_rows(ids, 10), torch.randn(12, 64, generator=torch.Generator().manual_seed(0)))
    positions = mrope_positions(ids, spec, grid)
    assert positions[1] < 0
    cpu = _prompt_and_greedy(_load(path), ids, positions, embeds, 6)
    gpu_model = _load(path, "cuda", "triton")
    assert gpu_model.layers[0].self_attn.fused
    gpu = _prompt_and_greedy(gpu_model, ids, positions, embeds, 6)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=2e-3, rtol=2e-3)
    assert gpu[1] == cpu[1]
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny:qwen2.5-vl", "tiny:qwen2.5-omni"])
def test_text_only_on_cuda_graphs_equals_cpu(model):
    """Text-only requests of the multimodal checkpoints keep 1-D positions: CUDA graphs (decode and mixed
    steps) give the CPU engine's tokens."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    cpu = [o["token_ids"] for o in make_llm(model).generate(PROMPTS, params, use_tqdm=False)]
    gpu = make_llm(model, device="cuda", dtype="float32", enforce_eager=False)
    assert gpu.runner.graphs
    assert [o["token_ids"] for o in gpu.generate(PROMPTS, params, use_tqdm=False)] == cpu
