"""Multimodal prompts on CUDA: the fused rope kernel with M-RoPE rows, decode CUDA graphs with the
rope-delta column, multi-step decode runs, against the eager engine on the same GPU (float32)."""

import pytest

from omni_ray.ar import SamplingParams
from tests.ar.conftest import PROMPTS, make_llm
from tests.ar.test_mm_encoders import _image, _wave

pytestmark = pytest.mark.gpu


def _prompts(llm, kinds_list):
    out = []
    for i, kinds in enumerate(kinds_list):
        parts = [{"type": k} for k in kinds] + [{"type": "text", "text": f"Question {i}: what is it?"}]
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                 add_generation_prompt=True)
        data = {}
        if "image" in kinds:
            data["image"] = [_image(60 + 20 * i, 90, i) for _ in range(kinds.count("image"))]
        if "audio" in kinds:
            data["audio"] = [(_wave(16000, i), 16000)]
        out.append({"prompt": text, "multi_modal_data": data})
    return out


@pytest.mark.parametrize("model, kinds", [("tiny:qwen2.5-vl", [["image"], ["image", "image"], ["image"]]),
                                          ("tiny:qwen2.5-omni", [["image", "audio"], ["audio"], ["image"]])])
def test_cuda_graphs_with_media_equal_eager(model, kinds):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eager = make_llm(model, device="cuda", dtype="float32", warmup=False)
    want = eager.generate(_prompts(eager, kinds) + PROMPTS[:2], params, use_tqdm=False)
    gpu = make_llm(model, device="cuda", enforce_eager=False, dtype="float32", decode_steps=4, warmup=False)
    got = gpu.generate(_prompts(gpu, kinds) + PROMPTS[:2], params, use_tqdm=False)
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    assert gpu.runner.graphs                                  # decode ran through the graphs
