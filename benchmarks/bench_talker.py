"""Qwen2.5-Omni talker on the AR engine vs transformers' talker ``generate``: codec tokens per second,
time to the first codec token and the talker's real-time factor (seconds of compute per second of
speech; the codec runs at 50 tokens per second of audio), at several concurrencies. ``ms_per_code``: a
stream's time per codec token after its first (the decode step time its user sees); ``rtf``: a stream's
wall time per second of its audio (goal: <= 0.1, 200 codes in < 0.4 s). On a GPU the talker's decode steps
replay the decode CUDA graphs (step rows and the repetition penalty on the device, multi-step runs).

The talker is built in the 7B checkpoint's shape (transformers' ``Qwen2_5OmniTalkerConfig`` defaults:
hidden 896, 24 layers, 12 heads / 4 KV heads of 128, codec vocabulary 8448, input rows of 3584), random
bf16 weights, saved once as a talker-only directory (``model_type: qwen2_5_omni_talker``). Inputs are
random thinker rows: a prompt of ``--prompt`` rows and one row per decode step (as the thinker hands
them over), ``--codes`` codec tokens per request (EOS ignored), the reference's sampling.

    python benchmarks/bench_talker.py                          # GPU: 7B shape, concurrency 1 and 16
                                                               # (graphs; eager steps; transformers)
    python benchmarks/bench_talker.py --tiny --codes 16        # CPU smoke run on tiny dimensions
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, sync, table, write_result

CODEC_HZ = 50      # Qwen2.5-Omni codec tokens per second of audio


def build_talker_dir(out: Path, tiny: bool) -> Path:
    """A talker-only checkpoint (config, safetensors, a tokenizer for the engine's bookkeeping)."""
    from transformers import Qwen2_5OmniTalkerConfig, Qwen2_5OmniTalkerForConditionalGeneration

    from omni_ray.testing.tokenizer import save_tokenizer

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    kw = {}
    if tiny:
        kw = dict(vocab_size=64, embedding_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  rope_parameters=dict(rope_theta=1e6, rope_type="default", mrope_section=[2, 3, 3]),
                  tts_codec_start_token_id=60, tts_codec_end_token_id=61, tts_codec_pad_token_id=62,
                  tts_codec_mask_token_id=63)
    config = Qwen2_5OmniTalkerConfig(**kw)
    dtype = torch.float32 if tiny else torch.bfloat16
    config.dtype = dtype
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5OmniTalkerForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
    save_tokenizer(out, "chatml", fill_to=config.vocab_size)
    return out


def make_inputs(n: int, prompt: int, codes: int, width: int, seed: int = 0):
    """Per request: prompt rows [prompt + 2, E] and ``codes`` step rows [E] (random thinker states)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(prompt + 2, width, generator=g) * 0.5, torch.randn(codes, width, generator=g) * 0.5)
            for _ in range(n)]


def run_omni_ray(llm, inputs, codes: int) -> dict:
    from omni_ray.ar.input_embeds import InputEmbeds
    from omni_ray.ar.models.qwen2_5_omni_talker_inputs import talker_sampling_params

    tokens = llm.arch.talker
    params = talker_sampling_params(tokens, max_tokens=codes, ignore_eos=True, seed=0)
    ids = lambda rows: [tokens.codec_mask] * (rows.shape[0] - 2) + [tokens.codec_pad, tokens.codec_bos]  # noqa: E731
    sync()
    t0 = time.perf_counter()
    seqs = [llm.add_request({"prompt_embeds": InputEmbeds(p, steps=s, tail=s[-1]), "prompt_token_ids": ids(p)},
                            params) for p, s in inputs]
    first: dict[int, float] = {}
    while not llm.is_finished():
        llm.step()
        now = time.perf_counter()
        for s in seqs:
            if s.num_output_tokens and s.seq_id not in first:
                first[s.seq_id] = now - t0
    total = time.perf_counter() - t0
    n_codes = sum(s.num_output_tokens for s in seqs)
    first_ms = 1e3 * sum(first.values()) / len(first)
    return dict(first_code_ms=first_ms, ms_per_code=(1e3 * total - first_ms) / max(1, codes - 1), total_s=total,
                codes_per_s=n_codes / total, rtf=total / (codes / CODEC_HZ))


def run_transformers(model, inputs, codes: int) -> dict:
    c = model.config
    n = len(inputs)
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prompt = torch.stack([p for p, _ in inputs]).to(dev, dtype)
    reply = torch.stack([s for _, s in inputs]).to(dev, dtype)
    L = prompt.shape[1]
    input_ids = torch.full((n, L), c.tts_codec_mask_token_id, device=dev)
    input_ids[:, -2], input_ids[:, -1] = c.tts_codec_pad_token_id, c.tts_codec_start_token_id
    text_ids = torch.zeros((n, L), dtype=torch.long, device=dev)
    mask = torch.ones((n, L), dtype=torch.long, device=dev)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.rope_deltas = None
        model.generate(input_ids=input_ids, input_text_ids=text_ids, thinker_reply_part=reply,
                       inputs_embeds=prompt.clone(), attention_mask=mask, suppress_tokens=[c.tts_codec_start_token_id],
                       max_new_tokens=codes, min_new_tokens=codes, do_sample=True, top_k=40, top_p=0.8,
                       temperature=0.9, repetition_penalty=1.05, eos_token_id=[c.tts_codec_pad_token_id,
                                                                               c.tts_codec_end_token_id],
                       pad_token_id=c.tts_codec_pad_token_id)
    sync()
    total = time.perf_counter() - t0
    return dict(first_code_ms=float("nan"), ms_per_code=1e3 * total / codes, total_s=total,
                codes_per_s=n * codes / total, rtf=total / (codes / CODEC_HZ))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions (a CPU smoke run)")
    ap.add_argument("--dir", default=None, help="where the talker checkpoint is built (default: a cache folder)")
    ap.add_argument("--prompt", type=int, default=100, help="thinker prompt rows")
    ap.add_argument("--codes", type=int, default=200, help="codec tokens per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager-steps engine (rows from the host)")
    args = ap.parse_args()
    from transformers import Qwen2_5OmniTalkerForConditionalGeneration

    from omni_ray.ar import LLM
    from omni_ray.testing import cache_root

    folder = Path(args.dir) if args.dir else cache_root() / ("bench-talker-tiny" if args.tiny else "bench-talker-7b")
    path = build_talker_dir(folder, args.tiny)
    cuda = torch.cuda.is_available()
    max_len = args.prompt + args.codes + 16
    # KV blocks for the largest burst (not a share of the GPU: the eager engine and transformers share it)
    kv = dict(num_kvcache_blocks=max(args.concurrency) * -(-max_len // 256) + 8, kvcache_block_size=256,
              max_num_seqs=max(32, *args.concurrency)) if cuda else {}
    llm = LLM(str(path), submodel="talker", max_model_len=max_len, enforce_eager=not cuda, **kv)
    width = llm.arch.input_size
    run_omni_ray(llm, make_inputs(1, args.prompt, 4, width), 4)               # warm-up
    eager = None
    if not args.no_eager:          # the talker before its decode graphs: one eager forward a step, rows from the host
        eager = LLM(str(path), submodel="talker", max_model_len=max_len, enforce_eager=True, **kv)
        eager.runner.step_rows = None
        run_omni_ray(eager, make_inputs(1, args.prompt, 4, width), 4)
    hf = None
    if not args.no_transformers:
        dev = "cuda" if cuda else "cpu"
        hf = Qwen2_5OmniTalkerForConditionalGeneration.from_pretrained(path, dtype=llm.runner.dtype).to(dev).eval()
    rows = []
    for c in args.concurrency:
        inputs = make_inputs(c, args.prompt, args.codes, width, seed=c)
        run_omni_ray(llm, make_inputs(c, args.prompt, 8, width, seed=c + 1), 8)       # this batch size, warm
        rows.append(dict(engine="omni-ray", concurrency=c, **run_omni_ray(llm, inputs, args.codes)))
        if eager is not None:
            rows.append(dict(engine="omni-ray eager steps", concurrency=c, **run_omni_ray(eager, inputs, args.codes)))
        if hf is not None:
            rows.append(dict(engine="transformers", concurrency=c, **run_transformers(hf, inputs, args.codes)))
    print(f"talker ({'tiny' if args.tiny else '7B shape'}), {device_name()}, prompt {args.prompt} rows, "
          f"{args.codes} codes per request")
    print(f"decode CUDA graphs: {len(llm.runner.graphs)} batch sizes; {llm.stats.forwards} forwards in "
          f"{llm.stats.steps} engine steps (multi-step decode runs)")
    print(table(rows, ["engine", "concurrency", "first_code_ms", "ms_per_code", "total_s", "codes_per_s", "rtf"]))
    name = f"talker_{'cuda' if torch.cuda.is_available() else 'cpu_quick'}.json"
    print(write_result(name, dict(args=vars(args), rows=rows, graphs=sorted(llm.runner.graphs),
                                  forwards=llm.stats.forwards, steps=llm.stats.steps)))


if __name__ == "__main__":
    main()
