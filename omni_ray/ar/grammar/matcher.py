"""``SequenceGrammar``: one sequence's constraint state inside the engine.

Created at add_request with the compilation's ``Future``; the sequence waits (outside the
scheduler) until ``ready``; then one ``xgrammar.GrammarMatcher`` follows the sequence: ``advance``
with each accepted token, ``fill`` of its next-token bitmask row before each sampling, ``free``
when the sequence finishes, is aborted or fails (``GrammarCompiler.num_active`` counts the live ones).

Completion: once the grammar is complete and allows nothing but a stop token, the sequence ends
there (finish_reason "stop", no EOS token emitted); a grammar that may go on (``[a-z]+``) ends at a
stop token the model picks, or at max_tokens ("length", its output cut off, as OpenAI's).
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import xgrammar as xgr


class SequenceGrammar:
    __slots__ = ("owner", "future", "matcher", "stop_ids", "_row")

    def __init__(self, owner, future: Future):
        self.owner = owner                  # the GrammarCompiler (counts live matchers)
        self.future = future
        self.matcher: xgr.GrammarMatcher | None = None
        self.stop_ids = owner.stop_token_ids
        self._row: np.ndarray | None = None

    @property
    def ready(self) -> bool:
        return self.future.done()

    def start(self) -> None:
        """The matcher, once compiled (raises the compilation's InvalidRequestError, if any)."""
        if self.matcher is None:
            self.matcher = xgr.GrammarMatcher(self.future.result())
            self.owner.num_active += 1

    def advance(self, token_id: int) -> str | None:
        """Accept ``token_id``; returns "stop" when the output is complete (the grammar accepted a
        stop token, or allows nothing but one), "error" when the grammar rejects the token, else None."""
        m = self.matcher
        if not m.accept_token(token_id):
            return "error"
        if m.is_terminated():
            return "stop"
        if m.is_completed() and self._only_stop_allowed():
            return "stop"
        return None

    def _only_stop_allowed(self) -> bool:
        if self._row is None:
            self._row = np.zeros((1, xgr.get_bitmask_shape(1, self.owner.vocab_size)[1]), dtype=np.int32)
        self.matcher.fill_next_token_bitmask(self._row)
        row = self._row[0].view(np.uint32)
        for t in self.stop_ids:
            row[t // 32] &= np.uint32(~(1 << (t % 32)) & 0xFFFFFFFF)
        return not row.any()

    def free(self) -> None:
        if self.matcher is not None:
            self.matcher = None
            self.owner.num_active -= 1
        self.future = None
