"""A request's state inside the engine: its tokens, its blocks, its progress."""

from __future__ import annotations

import enum
import itertools

import torch

from omni_ray.ar.sampling_params import EncodeParams, SamplingParams


class SeqStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


_counter = itertools.count()


class Sequence:
    def __init__(self, token_ids: list[int], params: SamplingParams | EncodeParams,
                 request_id: str | None = None, block_size: int = 256, mm=None, input_embeds=None):
        self.seq_id = next(_counter)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.status = SeqStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.block_size = block_size
        self.mm = mm                       # MultiModalInputs (media items, M-RoPE positions) or None
        self.input_embeds = input_embeds   # InputEmbeds (omni_ray/ar/input_embeds.py): rows in, not token ids
        self.block_table: list[int] = []
        self.num_computed_tokens = 0       # tokens whose K/V are in the cache
        self.num_cached_tokens = 0         # of which came from the prefix cache (last admission)
        self.num_hashed_blocks = 0         # leading full blocks registered in the prefix cache
        self.finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
        self.error = None                      # the EngineError of a step that failed it
        self.logprobs: list[float] = []        # each output token's log-probability (params.logprobs set)
        self.top_logprobs: list[list[tuple[int, float]]] = []   # ... and its top alternatives (logprobs > 0)
        # prompt tokens' (params.prompt_logprobs set): position 0 has none; each other (logprob, top alternatives)
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None]
        self.hidden_chunks: list[torch.Tensor] = []   # encode requests: [n, H] per prefill chunk
        # params.return_hidden_states: [n, H] float32 rows not handed out yet (position order), and how many
        # positions have had theirs (a recomputed sequence skips those: preemption never repeats a row)
        self.hidden_rows: list[torch.Tensor] = []
        self.num_hidden_rows = 0
        self.sent_positions = False             # ... and whether its prompt's M-RoPE positions went out
        self.generator: torch.Generator | None = None  # per-request seed
        self.grammar = None                     # structured outputs: its SequenceGrammar (omni_ray.ar.grammar)
        self.arrival = next(_counter)
        # detokenizer state (omni_ray.ar.engine.detokenizer)
        self.output_text = ""
        self.prefix_offset = max(0, len(token_ids) - 5)
        self.read_offset = len(token_ids)
        self.stream_text = False
        self.stream = None              # AsyncLLM: the caller's stream state

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def is_encode(self) -> bool:
        return isinstance(self.params, EncodeParams)

    @property
    def num_cacheable_tokens(self) -> int:
        """Leading prompt tokens that may come from the prefix cache. The cache holds K/V only, not
        hidden states or logits: an encode request computes every position whose hidden state it
        returns (all after ``drop_tokens``), a request for prompt log-probabilities or for its hidden
        states (``return_hidden_states``) its whole prompt."""
        if self.input_embeds is not None:
            return 0
        if self.is_encode:
            return self.params.drop_tokens
        if getattr(self.params, "prompt_logprobs", None) is not None or self.wants_hidden:
            return 0
        return len(self.token_ids)

    @property
    def wants_hidden(self) -> bool:
        """A generating request that streams the hidden state of every position it feeds."""
        return not self.is_encode and getattr(self.params, "return_hidden_states", False)

    def add_hidden(self, rows: torch.Tensor, start: int) -> None:
        """Rows of positions ``start..start + len(rows)`` just computed: those past the ones already
        produced (a recompute after preemption computes earlier positions again) join ``hidden_rows``."""
        skip = self.num_hidden_rows - start
        if skip < len(rows):
            self.hidden_rows.append(rows[max(skip, 0):])
            self.num_hidden_rows = start + len(rows)

    def take_hidden_output(self) -> dict:
        """What an output of a ``return_hidden_states`` request carries: ``hidden_states``, the rows not handed
        out yet as one [n, H] tensor (None when there are none), and with its first output ``prompt_positions``
        [3, L] and ``rope_delta`` when its prompt had M-RoPE positions (media; else None)."""
        rows, self.hidden_rows = self.hidden_rows, []
        out = {"hidden_states": None if not rows else rows[0] if len(rows) == 1 else torch.cat(rows),
               "prompt_positions": None, "rope_delta": None}
        if not self.sent_positions and self.has_mrope_positions:
            self.sent_positions = True
            out["prompt_positions"] = self.positions(0, self.num_prompt_tokens).clone()
            out["rope_delta"] = self.rope_delta
        return out

    @property
    def num_dropped_rows(self) -> int:
        """Encode requests: the leading positions whose hidden states are not returned."""
        return self.params.drop_tokens if self.is_encode else 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_blocks(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < len(self.token_ids) - 1 or self.num_computed_tokens == 0

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def block_key(self, i: int) -> tuple:
        """What identifies block i's KV beyond the prefix before it: its tokens, and the content
        hashes of the media whose placeholder tokens it holds (equal placeholders, other image:
        other KV)."""
        tokens = tuple(self.block_tokens(i))
        if self.input_embeds is not None:          # K/V of its own rows: never shared
            return (tokens, ("embeds", self.seq_id))
        if self.mm is None:
            return tokens
        lo, hi = i * self.block_size, (i + 1) * self.block_size
        media = tuple((it.offset, it.hash) for it in self.mm.items if it.offset < hi and it.end > lo)
        return (tokens, media) if media else tokens

    @property
    def rope_delta(self) -> int:
        """Rope position minus token index after an M-RoPE prompt (0 for text)."""
        if self.input_embeds is not None and self.input_embeds.positions is not None:
            return self.input_embeds.rope_delta
        return self.mm.rope_delta if self.mm is not None else 0

    @property
    def has_mrope_positions(self) -> bool:
        """Its prompt has M-RoPE positions of its own (media, or input embeddings that came with them)."""
        return self.mm is not None or (self.input_embeds is not None and self.input_embeds.positions is not None)

    @property
    def waits_for_input(self) -> bool:
        """Its next decode step's input row has not arrived yet (streamed input embeddings)."""
        e = self.input_embeds
        return (e is not None and not self.in_prefill and self.num_computed_tokens >= len(e)
                and not e.ready(self.num_computed_tokens - len(e)))

    def positions(self, start: int, n: int):
        """M-RoPE positions [3, n] (int64) of tokens start..start+n: the prompt's own, then index + delta."""
        if self.mm is None:
            return self.input_embeds.position_rows(start, n)
        pos = self.mm.positions
        T = pos.shape[1]
        head = pos[:, start:min(start + n, T)]
        if start + n <= T:
            return head
        tail = torch.arange(max(start, T), start + n, dtype=torch.long) + self.mm.rope_delta
        return torch.cat([head, tail.expand(3, -1)], dim=1)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preemption: drop all cache state; the whole sequence is recomputed later."""
        self.block_table = []
        self.num_computed_tokens = 0
        self.num_hashed_blocks = 0
        self.hidden_chunks = []
        self.status = SeqStatus.WAITING
