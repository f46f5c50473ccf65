"""``GrammarCompiler``: one per engine (tokenizer): grammars compiled against the model's vocabulary
in threads, cached by constraint.

The vocabulary is the model's (its embedding rows, which may exceed ``len(tokenizer)``: the extra
ids are never allowed) and its stop tokens are the engine's EOS ids (allowed only where the grammar
is complete). Building the tokenizer info takes ~1 s for a 150k vocabulary: it starts in a thread
with the first constrained request (or the engine's warm-up on CUDA), which alone waits for it.

``submit(params)`` validates the constraint at once (``parse.to_grammar``: a bad one raises
``InvalidRequestError`` before any compute) and returns a ``Future`` of the compiled grammar: the
request waits for it (vLLM's WAITING_FOR_FSM) while the engine loop goes on stepping the others.
Identical constraints (``StructuredOutputsParams.key()``) share one compilation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import xgrammar as xgr

from omni_ray.ar.grammar.parse import clean_message, to_grammar
from omni_ray.ar.structured_outputs import StructuredOutputsParams
from omni_ray.config import StructuredOutputsConfig
from omni_ray.errors import InvalidRequestError


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int],
                 cfg: StructuredOutputsConfig | None = None):
        self.cfg = cfg or StructuredOutputsConfig()
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(self.cfg.compile_threads, thread_name_prefix="omni-grammar")
        self._compiler: Future | None = None     # xgrammar's compiler, built on first use
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0              # compilations run (cache misses)
        self.num_active = 0                # live matchers (SequenceGrammar), freed on finish / abort

    def _build(self) -> xgr.GrammarCompiler:
        info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=self.stop_token_ids)
        return xgr.GrammarCompiler(info, max_threads=self.cfg.compile_threads, cache_enabled=False)

    def submit(self, params: StructuredOutputsParams) -> Future:
        """A Future of the compiled grammar of ``params`` (raises InvalidRequestError at once for a
        bad constraint)."""
        key = params.key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
        grammar = to_grammar(params, self.cfg.any_whitespace)       # outside the lock: may take a while
        with self._lock:
            if self._compiler is None:
                self._compiler = self._pool.submit(self._build)
            fut = self._cache.get(key)
            if fut is None:
                fut = self._cache[key] = self._pool.submit(self._compile, grammar, params.param)
                while len(self._cache) > self.cfg.cache_size:
                    self._cache.popitem(last=False)
            return fut

    def _compile(self, grammar: xgr.Grammar, param: str) -> xgr.CompiledGrammar:
        self.num_compiled += 1
        try:
            return self._compiler.result().compile_grammar(grammar)
        except RuntimeError as err:
            raise InvalidRequestError(f"{param}: cannot compile the constraint: {clean_message(err)}",
                                      param=param) from None

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Blocking form of ``submit`` (tests, tools)."""
        return self.submit(params).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
