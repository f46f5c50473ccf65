"""Greedy tokens and log-probabilities equal transformers' on the same weights (fp32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from omni_ray.ar import SamplingParams
from omni_ray.testing import resolve_model
from tests.ar.conftest import PROMPTS, make_llm

N_NEW = 24


@pytest.mark.parametrize("model", ["tiny:qwen3", "tiny:qwen2", "tiny:llama", "tiny:qwen3-wide"])
def test_greedy_and_logprobs_match_transformers(model):
    llm = make_llm(model)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32).eval()
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
        ref_ids, ref_lp = greedy(hf, ids, N_NEW)
        assert out["token_ids"] == ref_ids, f"{model}: {prompt!r}"
        torch.testing.assert_close(torch.tensor(out["logprobs"]), ref_lp, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def greedy(hf, ids: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens and their logprobs, EOS included like any token (``ignore_eos``:
    generate(min_new_tokens=...) would instead forbid EOS, which the engine does not)."""
    out, lps = [], []
    for _ in range(n):                          # whole forwards: no cache API differences across versions
        logp = hf(torch.cat([ids, torch.tensor([out], dtype=ids.dtype)], 1)).logits[0, -1].float().log_softmax(-1)
        t = int(logp.argmax())
        out.append(t)
        lps.append(logp[t])
    return out, torch.stack(lps)


def test_hidden_states_match_transformers(qwen3):
    hf = AutoModelForCausalLM.from_pretrained(resolve_model("tiny:qwen3"), dtype=torch.float32).eval()
    prompt = PROMPTS[0]
    ids = qwen3.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states     # emb, layer 1, ..., final (normed)
    for layer in (None, 0, 1, -1):
        got = qwen3.encode([prompt], layer=layer)[0]
        want = ref[-1 if layer is None else layer][0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    import json
    import shutil

    from omni_ray.errors import ConfigError
    src = resolve_model("tiny:qwen3")
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        make_llm(str(tmp_path))
