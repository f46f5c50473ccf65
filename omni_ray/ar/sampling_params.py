"""Per-request sampling parameters (vLLM / nano-vllm names), and their rules.

``SAMPLING_RULES`` is the one declaration of what each number may be: ``SamplingParams`` checks
it (``InvalidRequestError`` naming the field), and the HTTP models document it as OpenAPI bounds
(deployments/openai/protocol.py), so offline, Python handle and HTTP callers get the same message.
``SamplingParams()`` is the reference's default (``max_tokens=16``, as vLLM); the HTTP API fills
its own (OpenAI's) defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from omni_ray.ar.structured_outputs import StructuredOutputsParams
from omni_ray.errors import InvalidRequestError
from omni_ray.rules import Rule

MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
MAX_LOGPROBS = 20          # top alternatives per token: OpenAI's bound (vLLM's default max_logprobs is 20)

SAMPLING_RULES: dict[str, Rule] = {
    "temperature": Rule("number", ge=0.0, le=2.0, optional=False, note="(0: greedy)"),
    "top_p": Rule("number", gt=0.0, le=1.0, optional=False),
    "top_k": Rule("integer", ge=-1, optional=False, note="(-1 or 0: off)"),
    "min_p": Rule("number", ge=0.0, le=1.0, optional=False),
    "repetition_penalty": Rule("number", gt=0.0, le=10.0, optional=False,
                               note="(1: off; > 1 discourages the prompt's and output's tokens)"),
    "max_tokens": Rule("integer", ge=0, note="(0: the prompt only; None: up to the context length)"),
    "seed": Rule("integer", ge=0, lt=2**63),
    "logprobs": Rule("integer", ge=0, le=MAX_LOGPROBS, note="(alternatives besides the chosen token; None: off)"),
    "prompt_logprobs": Rule("integer", ge=0, le=MAX_LOGPROBS,
                            note="(alternatives besides each prompt token; None: off)"),
}
_FLAGS = ("ignore_eos", "skip_special_tokens", "return_hidden_states")


def _bad(param: str, msg: str):
    raise InvalidRequestError(f"{param} {msg}", param=param)


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1                   # -1 / 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # vLLM / transformers: seen tokens' logits / p (> 0) or * p (< 0); eager steps
    max_tokens: int | None = 16       # None: fill the context (``resolve_max_tokens``)
    ignore_eos: bool = False
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = None       # each chosen token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # each prompt token's (the first: None) and this many alternatives
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None   # constrained decoding (omni_ray.ar.grammar)
    # the final (normed) hidden state of every position fed to the model, streamed in the outputs (a thinker's
    # rows for its talker): engine / stage level only, not an HTTP field (ENGINE_ONLY_KEYS)
    return_hidden_states: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop, (list, tuple)):
            self.stop = [s for s in self.stop if s != ""] or None
        if isinstance(self.structured_outputs, dict):       # vLLM's shape: {"json": schema} / {"regex": ...}
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self.validate()

    def validate(self) -> None:
        for name, rule in SAMPLING_RULES.items():
            rule.check(name, getattr(self, name))
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                _bad(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.stop is not None:
            if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
                _bad("stop", f"must be a string or a list of strings, got {self.stop!r}")
            if len(self.stop) > MAX_STOP_STRINGS:
                _bad("stop", f"has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
            for i, s in enumerate(self.stop):
                if len(s) > MAX_STOP_CHARS:
                    _bad("stop", f"string {i} has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed")
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            _bad("structured_outputs", f"must be a StructuredOutputsParams, got {type(so).__name__}")
        ids = self.stop_token_ids
        if ids is not None and (not isinstance(ids, list)
                                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            _bad("stop_token_ids", f"must be a list of integers, got {ids!r}")

    def resolve_max_tokens(self, num_prompt_tokens: int, max_model_len: int,
                           cap: int | None = None) -> SamplingParams:
        """These params with ``max_tokens=None`` replaced by the room left in the context (at most
        ``cap``); ``self`` when max_tokens is set."""
        if self.max_tokens is not None:
            return self
        room = max_model_len - num_prompt_tokens
        if room < 1:
            raise InvalidRequestError(f"prompt has {num_prompt_tokens} tokens; max_model_len is {max_model_len}",
                                      param="prompt")
        return dataclasses.replace(self, max_tokens=room if cap is None else min(room, cap))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# fields a pipeline wires, never a client: outside SAMPLING_KEYS (the step / HTTP arguments)
ENGINE_ONLY_KEYS = frozenset({"return_hidden_states"})
SAMPLING_KEYS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - ENGINE_ONLY_KEYS


@dataclass
class EncodeParams:
    """A prompt-only request that returns the prompt's hidden states.

    ``layer=-1`` gives the final (normed) hidden states, ``layer=k`` the residual stream after
    decoder layer k (the same indexing as transformers' ``output_hidden_states[k]``; 0 is the
    embeddings).

    ``drop_tokens=k``: the first k prompt positions need their K/V but not their hidden states (a
    text encoder's template prefix): the output is the rows of positions k.., and those k positions
    may come from the prefix cache (full blocks), so a shared template is computed once."""

    layer: int | None = None
    extra: dict = field(default_factory=dict)
    drop_tokens: int = 0
