"""Per-request sampling parameters (vLLM / nano-vllm names). ``SamplingParams()`` is the reference's
default (``max_tokens=16``, as vLLM); the HTTP API fills its own (OpenAI's) defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni_ray.errors import InvalidRequestError


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1                   # -1 / 0 = off
    min_p: float = 0.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: bool = False            # return the log-probability of each chosen token
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s] or None
        self.validate()

    def validate(self) -> None:
        def bad(param: str, msg: str):
            raise InvalidRequestError(f"{param} {msg}", param=param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0 or self.temperature != self.temperature:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"must be -1 (off) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            bad("seed", f"must be a non-negative integer, got {self.seed!r}")
        if self.stop and (len(self.stop) > 16 or any(len(s) > 256 for s in self.stop)):
            bad("stop", "at most 16 stop strings of at most 256 characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class EncodeParams:
    """A prompt-only request that returns the prompt's hidden states.

    ``layer=-1`` gives the final (normed) hidden states, ``layer=k`` the residual stream after
    decoder layer k (the same indexing as transformers' ``output_hidden_states[k]``; 0 is the
    embeddings)."""

    layer: int | None = None
    extra: dict = field(default_factory=dict)
