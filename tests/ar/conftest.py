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


@pytest.fixture
def resumes(monkeypatch):
    """Counts the runs queued on top of one in flight (``launch_decode(..., resume=True)``)."""
    from omni_ray.ar.worker.model_runner import ModelRunner
    count = {"resumed": 0}
    launch = ModelRunner.launch_decode

    def spy(self, batch, num_steps, resume=False):
        count["resumed"] += resume
        return launch(self, batch, num_steps, resume)

    monkeypatch.setattr(ModelRunner, "launch_decode", spy)
    return count
