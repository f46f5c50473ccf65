import pytest

from omni_ray.ar import LLM

PROMPTS = [
    "The old lighthouse stood at the edge of the harbour",
    "Hello! How can I help you today?",
    "A",
    "Write a short poem about a red fox running through fresh snow under a full moon, then describe the",
]


def make_llm(model="tiny:qwen3", **kw):
    args = dict(enforce_eager=True, device="cpu", kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=512)
    args.update(kw)
    return LLM(model, **args)


@pytest.fixture(scope="session")
def qwen3():
    return make_llm("tiny:qwen3")
