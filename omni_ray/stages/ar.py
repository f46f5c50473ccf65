"""The AR stage engine: typed ``ARRequest``s over an ``AsyncLLM`` (the ``StageEngine`` protocol).

A request's prompt becomes token ids here (chat template, system prompt, or raw text / ids), its
``max_tokens=None`` becomes the room left in the context (capped by ``limits.max_tokens``), and the
engine's outputs become plain dict deltas (what a Serve replica streams back):

    {"text", "token_ids", "finished", "finish_reason", "num_prompt_tokens", "num_output_tokens"}
    + "logprobs" (params.logprobs set): one entry per new token,
        {"id", "token", "logprob", "bytes", "top_logprobs": [{"id", "token", "logprob", "bytes"}, ...]}
      (the token's decoded text and true bytes, ``omni_ray.ar.engine.token_bytes``; k alternatives)
    + "prompt_logprobs" (params.prompt_logprobs set, first delta): one entry per prompt token (the first's
      logprob and top_logprobs None)
    + "prompt_text" (``req.echo``, first delta): the prompt as text (token-id prompts decoded)
    + "hidden_states" (params.return_hidden_states, a thinker feeding its talker): [n, H] float32, the final
      (normed) hidden states of the positions fed since the previous delta (the prompt's, then one per
      generated token once it is fed: all but the last); "prompt_positions" [3, L] and "rope_delta" in the
      first delta when the prompt had M-RoPE positions (media), and "prompt_token_ids" (the prompt as the engine
      took it) in the first delta. The Serve replica replaces the tensor by
      a ``Handoff`` holding its ObjectRef; ``OmniLLM`` by one holding the tensor
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

import torch

from omni_ray.ar.engine.token_bytes import TokenTable, token_table
from omni_ray.ar.multimodal import MultiModalInputs
from omni_ray.ar.multimodal.prompts import chat_inputs, data_inputs
from omni_ray.ar.text_encoding import TextEncoding, text_encoding_for
from omni_ray.config import AREngineConfig, LimitsConfig, MediaConfig
from omni_ray.errors import InvalidRequestError
from omni_ray.rules import check_prompt_tokens
from omni_ray.stages.encoder import Encode, attach_embeddings
from omni_ray.stages.protocol import EngineStage
from omni_ray.stages.requests import ARRequest, Handoff


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The prompt ids of chat ``messages`` (with ``tools``, OpenAI's ``tools`` list, rendered by the
    model's own chat template, as transformers' ``apply_chat_template(..., tools=...)``)."""
    template = getattr(tokenizer, "chat_template", None)
    if tools and "tools" not in (template if isinstance(template, str) else " ".join((template or {}).values())):
        raise InvalidRequestError("this model's chat template does not render tools", param="tools")
    if template is None:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return tokenizer.encode(text, add_special_tokens=True)
    try:
        out = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=True, add_generation_prompt=True)
    except Exception as err:  # template errors (e.g. role order) are the caller's fault
        raise InvalidRequestError(f"chat template failed: {err}", param="messages") from None
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prompt_ids(tokenizer, req: ARRequest, max_prompt_tokens: int | None = None) -> list[int]:
    """The token ids of an AR request: chat ``messages`` (chat template), or a ``prompt`` that is
    wrapped as a user turn when ``system_prompt`` is set, or a raw prompt / token ids (the request
    checked its inputs when it was built)."""
    messages = req.messages
    if messages is None and req.system_prompt:
        messages = [{"role": "system", "content": req.system_prompt}, {"role": "user", "content": req.prompt}]
    if messages is not None:
        ids = render_chat(tokenizer, messages, req.tools)
    elif isinstance(req.prompt, str):
        ids = tokenizer.encode(req.prompt, add_special_tokens=True)
    else:
        ids = req.prompt                                # token ids; the engine checks the vocabulary
    check_prompt_tokens(len(ids), max_prompt_tokens)
    return list(ids)


def media_prompt(proc, req: ARRequest, media: MediaConfig, max_prompt_tokens: int | None = None) -> MultiModalInputs:
    """A request with images / audio -> its processed prompt (``omni_ray.ar.multimodal``)."""
    if proc is None:
        raise InvalidRequestError("this model takes text only; image / audio inputs are not accepted",
                                  param="messages" if req.messages is not None else "multi_modal_data")
    if req.messages is not None:
        mm = chat_inputs(proc, req.messages, media)
    elif req.system_prompt:                  # the prompt (with its placeholders) as the user turn
        text = proc.tokenizer.apply_chat_template([{"role": "system", "content": req.system_prompt},
                                                   {"role": "user", "content": req.prompt}],
                                                  tokenize=False, add_generation_prompt=True)
        mm = data_inputs(proc, text, req.multi_modal_data or {}, media)
    else:
        mm = data_inputs(proc, req.prompt, req.multi_modal_data, media)
    check_prompt_tokens(len(mm.token_ids), max_prompt_tokens)
    return mm


def pretokenize(tokenizer, reqs: list[ARRequest]) -> list[ARRequest]:
    """``reqs`` with each plain text prompt (no chat messages, no system prompt) replaced by its
    token ids, all encoded in one batch call (the tokenizer's Rust batch path): a burst's prompts
    cost the replica one call, not one each. Anything else is left for ``prompt_ids``."""
    idx = [i for i, r in enumerate(reqs) if r.is_plain_text and not r.echo]     # echo: the prompt as sent
    if len(idx) < 2:
        return reqs
    texts = [reqs[i].prompt for i in idx]
    backend = getattr(tokenizer, "backend_tokenizer", None)      # fast tokenizers: the Rust one, no wrapper
    if backend is not None:
        ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
    else:
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    out = list(reqs)
    for i, toks in zip(idx, ids):
        out[i] = dataclasses.replace(reqs[i], prompt=list(toks))
    return out


def merge_deltas(items: list[dict]) -> dict:
    """Fold consecutive AR deltas into one (a streaming consumer that fell behind gets one message)."""
    out = dict(items[-1])
    out["text"] = "".join(d["text"] for d in items)
    out["token_ids"] = [t for d in items for t in d["token_ids"]]
    if any("logprobs" in d for d in items):
        out["logprobs"] = [x for d in items for x in (d.get("logprobs") or [])]
    rows = [d["hidden_states"] for d in items if d.get("hidden_states") is not None]
    if rows:                                                 # in order, none dropped
        out["hidden_states"] = torch.cat(rows) if isinstance(rows[0], torch.Tensor) else Handoff.join(rows)
    for key in ("prompt_logprobs", "prompt_text", "prompt_positions", "rope_delta", "prompt_token_ids"):   # 1st only
        first = next((d[key] for d in items if key in d), None)
        if first is not None:
            out[key] = first
    return out


MIN_LOGPROB = -9999.0      # -inf is no JSON number: clamped as vLLM does


def logprob_entries(table: TokenTable, ids: list[int], lps: list[float], tops: list | None) -> list[dict]:
    """The stage's logprobs entries of tokens ``ids`` (``tops``: each one's [(id, logprob)] alternatives)."""
    out = []
    for j, (t, lp) in enumerate(zip(ids, lps)):
        e = table.entry(t, max(lp, MIN_LOGPROB))
        e["top_logprobs"] = [table.entry(a, max(alp, MIN_LOGPROB)) for a, alp in tops[j]] if tops else []
        out.append(e)
    return out


def prompt_logprob_entries(table: TokenTable, prompt) -> list[dict]:
    """``RequestOutput.prompt_logprobs`` ((ids, [None, (logprob, top)...])) as stage entries; the first
    token's has its text and bytes, and None for ``logprob`` and ``top_logprobs`` (nothing precedes it)."""
    ids, scored = prompt
    first = table.entry(ids[0], None) | {"top_logprobs": None}
    return [first] + logprob_entries(table, ids[1:], [x[0] for x in scored[1:]], [x[1] for x in scored[1:]])


class ARStageEngine(EngineStage):
    """``StageEngine`` over ``AsyncLLM``: ``generate`` (deltas, at most one per ``interval``:
    ``AsyncLLM.generate`` merges what comes meanwhile), ``encode`` (prompt hidden states)."""

    kind = "ar"

    def __init__(self, config: AREngineConfig, limits: LimitsConfig | None = None, engine=None,
                 media: MediaConfig | None = None, encoder: Encode | None = None):
        self.config, self.limits, self.media = config, limits or LimitsConfig(), media or MediaConfig()
        self.engine = engine                   # an AsyncLLM (built by ``start`` unless given)
        self.encoder = encoder                 # media items -> embeddings (an encoder stage), else None: inline

    def start(self) -> None:
        if self.engine is None:
            from omni_ray.ar import AsyncLLM
            self.engine = AsyncLLM(self.config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def text_encoding(self) -> TextEncoding | None:
        """The text-encoder recipe of the diffusers pipeline whose ``text_encoder`` this stage runs (its
        model path is that pipeline's directory), else None."""
        pipeline = self.engine.layout.pipeline
        return text_encoding_for(pipeline) if pipeline else None

    async def prompt(self, req: ARRequest) -> list[int] | MultiModalInputs:
        """The request's token ids, or its processed multimodal prompt (media decoded and checked under
        ``app.media``, the checkpoint's processor; in a worker thread, off the replica's event loop).
        With an ``encoder`` (an encoder stage) the media items carry their embeddings."""
        if not req.has_media:
            return prompt_ids(self.engine.tokenizer, req, self.limits.max_prompt_tokens)
        mm = await asyncio.to_thread(media_prompt, self.engine.mm_processor, req, self.media,
                                     self.limits.max_prompt_tokens)
        return mm if self.encoder is None else await attach_embeddings(mm, self.encoder)

    async def generate(self, req: ARRequest, interval=None) -> AsyncIterator[dict]:
        engine = self.engine
        prompt = await self.prompt(req)
        n = len(prompt.token_ids) if isinstance(prompt, MultiModalInputs) else len(prompt)
        params = req.params.resolve_max_tokens(n, engine.max_model_len, self.limits.max_tokens)
        table = token_table(engine.tokenizer) if params.logprobs is not None or params.prompt_logprobs is not None \
            else None
        first = True
        async for out in engine.generate(prompt, params, req.request_id, interval=interval):
            d = {"text": out.text, "token_ids": list(out.token_ids),
                 "finished": out.finished, "finish_reason": out.finish_reason,
                 "num_prompt_tokens": out.num_prompt_tokens, "num_output_tokens": out.num_output_tokens}
            if params.logprobs is not None:
                d["logprobs"] = logprob_entries(table, d["token_ids"], out.logprobs or [], out.top_logprobs)
            if out.prompt_logprobs is not None:
                d["prompt_logprobs"] = prompt_logprob_entries(table, out.prompt_logprobs)
            if out.hidden_states is not None:
                d["hidden_states"] = out.hidden_states
            if out.prompt_positions is not None:
                d["prompt_positions"], d["rope_delta"] = out.prompt_positions, out.rope_delta
            if first and params.return_hidden_states:      # whom the rows are of (a talker's prompt needs them)
                d["prompt_token_ids"] = list(prompt.token_ids if isinstance(prompt, MultiModalInputs) else prompt)
            if first and req.echo:
                ids = prompt.token_ids if isinstance(prompt, MultiModalInputs) else prompt
                d["prompt_text"] = req.prompt if isinstance(req.prompt, str) else engine.tokenizer.decode(ids)
            first = False
            yield d

    async def encode(self, req: ARRequest) -> torch.Tensor:
        """Prompt hidden states [T, H] (float32, CPU). With ``req.encoding`` (a text-encoder recipe,
        ``omni_ray.ar.text_encoding``) what the recipe's pipeline conditions on: [T - drop_tokens, H] of its
        layer, the template's dropped prefix served by the prefix cache. Concurrent calls (a prompt and
        its negative prompt) reach the engine in one loop turn and run in one step."""
        enc = req.encoding
        if enc is None:
            return await self.engine.encode(await self.prompt(req), req.request_id, layer=req.layer)
        prompt = await self.encoding_prompt(req)
        return await self.engine.encode(prompt, req.request_id, layer=enc.layer, drop_tokens=enc.drop_tokens)

    async def encode_batch(self, reqs: list[ARRequest]) -> list[torch.Tensor]:
        """``encode`` of each request, added to the engine together so that they run in one step (a prompt and
        its negative prompt, sent as one stage call); the first bad request's error is raised."""
        return list(await asyncio.gather(*(self.encode(r) for r in reqs)))

    async def encoding_prompt(self, req: ARRequest) -> list[int] | MultiModalInputs:
        """A text-encoder request's engine prompt: the recipe's template, truncation and image (resized as
        the pipeline does, then the model's processor: in a worker thread, off the replica's event loop)."""
        enc, engine = req.encoding, self.engine
        image = (req.multi_modal_data or {}).get("image")
        if image is None:
            ids = enc.inputs(engine.tokenizer, engine.mm_processor, req.prompt)
            check_prompt_tokens(len(ids), self.limits.max_prompt_tokens)
            return ids
        mm = await asyncio.to_thread(enc.inputs, engine.tokenizer, engine.mm_processor, req.prompt, image, self.media)
        check_prompt_tokens(len(mm.token_ids), self.limits.max_prompt_tokens)
        return mm if self.encoder is None else await attach_embeddings(mm, self.encoder)
