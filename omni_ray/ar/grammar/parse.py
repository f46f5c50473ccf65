"""A request's constraint as an ``xgrammar.Grammar``: the syntax checks, before any compute.

Converting a JSON schema, a regex or an EBNF grammar into xgrammar's grammar is fast (well under a
millisecond for request-sized schemas) and finds every syntax error; the slow part, compiling it
against the vocabulary, happens later in a thread (``compiler.py``). xgrammar's messages carry a
timestamp and a C++ source location; the user sees the message only, under the field they sent.
"""

from __future__ import annotations

import json
import re

import xgrammar as xgr

from omni_ray.ar.structured_outputs import StructuredOutputsParams
from omni_ray.errors import InvalidRequestError

_CPP_PREFIX = re.compile(r"^\s*(\[[\d:]+\]\s*)?\S+\.(cc|h|cpp):\d+:\s*")
_WHAT = {"json": "JSON schema", "regex": "regex", "grammar": "grammar", "choice": "choice"}


def clean_message(err: BaseException) -> str:
    """xgrammar's error text without its log prefix (``[10:42:47] /project/cpp/x.cc:94: ``)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return _CPP_PREFIX.sub("", text)


def choice_ebnf(choices: tuple[str, ...]) -> str:
    """``root ::= "a" | "b"``: each choice as an EBNF string literal (JSON escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def to_grammar(params: StructuredOutputsParams, any_whitespace: bool = False) -> xgr.Grammar:
    """The grammar of ``params``; a bad schema / regex / grammar is an ``InvalidRequestError`` naming
    ``params.param`` (the request field the caller used: ``response_format``, ``guided_regex``, ...)."""
    kind = params.kind
    try:
        if kind == "json_object":        # OpenAI's json_object: an object (xgrammar's builtin: any value)
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=any_whitespace,
                                                strict_mode=False)
        if kind == "json":
            schema = json.loads(params.schema_text())
            if not isinstance(schema, dict):
                raise ValueError(f"a JSON schema is an object, got {type(schema).__name__}")
            return xgr.Grammar.from_json_schema(params.schema_text(), any_whitespace=any_whitespace,
                                                strict_mode=True)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(params.grammar)
        return xgr.Grammar.from_ebnf(choice_ebnf(params.choice))
    except (RuntimeError, ValueError, TypeError) as err:
        raise InvalidRequestError(f"{params.param}: invalid {_WHAT.get(kind, kind)}: {clean_message(err)}",
                                  param=params.param) from None
