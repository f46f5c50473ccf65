"""Logprobs over HTTP with the real `openai` client: chat top_logprobs, completions logprobs: N,
echo (lm-evaluation-harness's loglikelihood request, token-id prompts), values equal to
transformers' on the same tiny checkpoint, bounds."""

import pytest
import torch

pytestmark = pytest.mark.ray
MODEL = "tiny-qwen3"


@pytest.fixture(scope="module")
def oai(omni_url):
    import openai

    return openai.OpenAI(base_url=omni_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omni_ray.testing import resolve_model
    path = resolve_model("tiny:qwen3")
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(path)))


def ref_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_chat_top_logprobs_are_token_text_with_true_bytes(oai):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about the sea"}], max_tokens=8,
              temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    r = oai.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        if not t.token.startswith("bytes:"):
            assert bytes(t.bytes).decode("utf-8") == t.token and "Ġ" not in t.token
    text = b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace")
    assert text == r.choices[0].message.content
    streamed = [t for ch in oai.chat.completions.create(stream=True, **kw) if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.bytes) for t in streamed] == [(t.token, t.bytes) for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_lm_eval_loglikelihood_request(oai, hf, max_tokens):
    """What lm-evaluation-harness's local-completions sends for loglikelihood: token-id prompts,
    echo, logprobs=1, temperature 0; the prompt's token_logprobs (first None) equal transformers'."""
    model, tok = hf
    prompts = [tok.encode("The old lighthouse stood at the edge of"), tok.encode("A red fox in the snow")]
    r = oai.completions.create(model=MODEL, prompt=prompts, max_tokens=max_tokens, logprobs=1, echo=True,
                               temperature=0, seed=1234)
    assert len(r.choices) == 2
    for ids, c in zip(prompts, sorted(r.choices, key=lambda c: c.index)):
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) + max_tokens == len(lp.token_logprobs) == len(lp.text_offset)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert c.text.startswith(tok.decode(ids)) and c.finish_reason == "length"
        assert "".join(lp.tokens[:len(ids)]) == tok.decode(ids)
        ref = ref_logprobs(model, ids)
        want = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
        for p in range(1, len(lp.tokens)):
            top = lp.top_logprobs[p]
            assert lp.tokens[p] in top and 1 <= len(top) <= 2
            assert max(top.values()) == pytest.approx(ref[p - 1].max().item(), abs=1e-4)
        if max_tokens:                      # the greedy continuation's own entry is its top-1
            assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-6)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.usage.completion_tokens == 2 * max_tokens


def test_completion_echo_streamed_equals_unary(oai):
    kw = dict(model=MODEL, prompt="The sky is", max_tokens=5, logprobs=2, echo=True, temperature=0,
              extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kw).choices[0]
    chunks = [ch.choices[0] for ch in oai.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(c.text for c in chunks) == whole.text and whole.text.startswith("The sky is")
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [t for c in chunks if c.logprobs for t in c.logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert all(len(t) in (2, 3) for t in whole.logprobs.top_logprobs[1:])
    plain = oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, echo=True, temperature=0,
                                   extra_body={"ignore_eos": True}).choices[0]
    assert plain.text == whole.text and plain.logprobs is None


@pytest.mark.parametrize("route,body,param", [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"logprobs": -1}, "logprobs"),
])
def test_logprob_bounds_are_400s_naming_the_field(client, route, body, param):
    if route == "chat":
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 2, **body})
    else:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_handle_generate_text_logprobs(omni_handle, oai):
    out = omni_handle.generate_text.remote("The sky is", max_tokens=4, temperature=0, logprobs=2,
                                           ignore_eos=True).result()
    assert [e["id"] for e in out["logprobs"]] == out["token_ids"]
    assert all(len(e["top_logprobs"]) == 2 and isinstance(e["token"], str) for e in out["logprobs"])
    assert b"".join(bytes(e["bytes"]) for e in out["logprobs"]).decode("utf-8", "replace") == out["text"]
    # n > 1 with echo: every choice echoes its prompt
    r = oai.completions.create(model=MODEL, prompt="The sky is", n=2, max_tokens=2, seed=5, echo=True, logprobs=0)
    assert [c.text.startswith("The sky is") for c in r.choices] == [True, True]
    assert all(c.logprobs.token_logprobs[0] is None and len(c.logprobs.tokens) == r.usage.prompt_tokens + 2
               for c in r.choices)
