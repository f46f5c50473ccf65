"""Constrained decoding with xgrammar (as vLLM and SGLang): a request's ``StructuredOutputsParams``
(omni_ray/ar/structured_outputs.py) becomes a grammar, compiled once per tokenizer and constraint,
a matcher per sequence, and a token bitmask applied to the constrained rows of each sampled batch.

* ``parse.py``: params -> ``xgrammar.Grammar`` (fast, at add_request: a bad schema is a 400 there)
* ``compiler.py``: ``GrammarCompiler``: the tokenizer's vocabulary, compilation in threads, the cache
* ``matcher.py``: ``SequenceGrammar``: one sequence's matcher, advanced with each accepted token
* ``masks.py``: ``GrammarMasks``: fill the rows' bitmasks on the host, apply them on the device
"""

from omni_ray.ar.grammar.compiler import GrammarCompiler
from omni_ray.ar.grammar.masks import GrammarMasks, constrained_rows
from omni_ray.ar.grammar.matcher import SequenceGrammar

__all__ = ["GrammarCompiler", "GrammarMasks", "SequenceGrammar", "constrained_rows"]
