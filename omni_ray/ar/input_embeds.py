"""Embeddings in instead of (or beside) token ids: a request's per-position input embeddings.

Any AR model can take them (``LLMEngine.add_request({"prompt_embeds": ...}, params)``):

* ``prompt`` [L, E]: the prompt's input rows. They replace the token embeddings of the prompt
  (vLLM's ``prompt_embeds``); ``prompt_token_ids`` may still name a token per row for models that
  combine both (the Qwen2.5-Omni talker adds the codec embedding of its last two prompt tokens).
* ``steps``: one row [E] per decode step, added to the embedding of the token that step feeds
  (decode input k is the token at position L + k). The Qwen2.5-Omni talker gets the thinker's
  projected states of the next text position this way. They may arrive while the request runs
  (``push``): a sequence whose next step has no row yet waits (the scheduler skips it) until
  ``push`` or ``close`` (which call ``on_input``: the engine's wake-up, ``LLMEngine.input_event``).
  After ``close``, steps past the pushed ones add ``tail`` (or nothing).
* ``positions`` [3, L] / ``rope_delta``: M-RoPE positions of the prompt rows, for M-RoPE models
  (decode position of index i >= L: i + rope_delta); None: 1-D positions 0, 1, ...

Such requests skip the prefix cache (their K/V depend on the rows, not on token ids alone). Models
fed a row per step (the talker) run their decode steps in the decode CUDA graphs and multi-step runs
(``omni_ray/ar/worker/step_rows.py``; a run goes only as far as the rows that have come); other models'
requests with step rows take the eager path.
"""

from __future__ import annotations

import threading

import torch

from omni_ray.errors import InvalidRequestError


class InputEmbeds:
    def __init__(self, prompt: torch.Tensor, steps: torch.Tensor | list[torch.Tensor] | None = None,
                 tail: torch.Tensor | None = None, closed: bool = True,
                 positions: torch.Tensor | None = None, rope_delta: int = 0):
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[0] == 0:
            raise InvalidRequestError("prompt_embeds must be a tensor [length >= 1, hidden]", param="prompt_embeds")
        self.prompt = prompt.detach()
        self.width = prompt.shape[1]
        self._steps: list[torch.Tensor] = []
        self._lock = threading.Lock()          # push / close may come from another thread than the engine's
        self.tail: torch.Tensor | None = None
        self.closed = False
        self.on_input = None                   # the engine's wake-up: called after each push / close
        if positions is not None and tuple(positions.shape) != (3, prompt.shape[0]):
            raise InvalidRequestError(f"positions must be [3, {prompt.shape[0]}], got {list(positions.shape)}",
                                      param="positions")
        self.positions = positions.long() if positions is not None else None
        self.rope_delta = int(rope_delta)
        if steps is not None and len(steps):
            self.push(steps)
        if closed:
            self.close(tail)

    def __len__(self) -> int:
        return self.prompt.shape[0]

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def _row(self, t: torch.Tensor, name: str) -> torch.Tensor:
        t = t.detach().reshape(-1, self.width) if t.dim() == 1 else t.detach()
        if t.dim() != 2 or t.shape[1] != self.width:
            raise InvalidRequestError(f"{name} rows must have width {self.width}, got {list(t.shape)}", param=name)
        return t

    def push(self, rows: torch.Tensor | list[torch.Tensor]) -> None:
        """More decode-step rows ([n, E], or a list of [E] / [n, E])."""
        if self.closed:
            raise InvalidRequestError("input embeddings are closed; no more step rows", param="step_embeds")
        parts = rows if isinstance(rows, (list, tuple)) else [rows]
        new = [r for p in parts for r in self._row(p, "step_embeds")]
        with self._lock:
            self._steps.extend(new)
        if self.on_input is not None:
            self.on_input()

    def close(self, tail: torch.Tensor | None = None) -> None:
        """No more step rows; steps past them add ``tail`` [E] (None: nothing)."""
        self.tail = self._row(tail, "tail")[0] if tail is not None else None
        self.closed = True
        if self.on_input is not None:
            self.on_input()

    def ready(self, step: int) -> bool:
        """Decode step ``step`` (0 = the first decode) has its row, or never gets one."""
        return self.closed or step < len(self._steps)

    def available(self, step: int) -> int | float:
        """How many consecutive decode steps from ``step`` have their rows (infinite once closed)."""
        return float("inf") if self.closed else max(0, len(self._steps) - step)

    def step(self, k: int) -> torch.Tensor | None:
        """The row added at decode step k (None: nothing added)."""
        if k < len(self._steps):
            return self._steps[k]
        return self.tail

    def rows(self, start: int, n: int) -> tuple[list[int], torch.Tensor | None, list[int], torch.Tensor | None]:
        """Positions start..start+n: (prompt rows' offsets, their embeddings), (step rows' offsets,
        their added rows); offsets within the chunk."""
        L = len(self)
        lo, hi = start, min(start + n, L)
        rep_idx = list(range(0, max(0, hi - lo)))
        rep = self.prompt[lo:hi] if hi > lo else None
        add_idx, add = [], []
        for p in range(max(start, L), start + n):
            row = self.step(p - L)
            if row is not None:
                add_idx.append(p - start)
                add.append(row)
        return rep_idx, rep, add_idx, (torch.stack(add) if add else None)

    def position_rows(self, start: int, n: int) -> torch.Tensor:
        """M-RoPE positions [3, n] of positions start..start+n (``positions`` set)."""
        L = len(self)
        head = self.positions[:, start:min(start + n, L)]
        if start + n <= L:
            return head
        tail = torch.arange(max(start, L), start + n, dtype=torch.long) + self.rope_delta
        return torch.cat([head, tail.expand(3, -1)], dim=1)
