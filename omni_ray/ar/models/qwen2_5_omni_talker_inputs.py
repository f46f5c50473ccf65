"""What the Qwen2.5-Omni thinker hands the talker, and how it becomes the talker's engine inputs.

transformers' ``Qwen2_5OmniForConditionalGeneration.generate`` builds the talker's inputs from the
thinker's token embeddings ``e`` and final (normed) hidden states ``h`` (rows of width E = the
thinker's hidden size):

* prompt rows (L + 2): ``h[p] + e[p]`` for each thinker prompt position p (``e`` zero on image, audio
  and video placeholder rows), then ``emb(speaker bos)`` (the voice's ``bos_token`` in spk_dict.pt),
  then ``h + e`` of the thinker's first generated token; tokens ``[codec_mask] * L + [codec_pad,
  codec_bos]`` (the talker adds the codec embeddings of the last two);
* decode step k (feeding the talker's k-th codec token): ``h + e`` of thinker token k + 1, then, once the
  thinker's reply is used up, ``emb(text_eos)`` once and ``emb(text_pad)`` on every later step.
  The thinker's last token (its EOS) is never fed to it, so it has no state and is not used;
* positions: the thinker prompt's M-RoPE positions and two more (text), or 0 .. L + 1 for a text prompt.

``TalkerInput`` takes these as they come (``add_token`` per fed thinker token, ``finish`` at the end)
and exposes ``embeds`` (an ``InputEmbeds``, streamed) and ``token_ids`` for ``LLMEngine.add_request``.
The talker can start once the thinker has fed its first generated token.
"""

from __future__ import annotations

import torch

from omni_ray.ar.input_embeds import InputEmbeds
from omni_ray.ar.models.qwen2_5_omni_talker import TalkerTokens
from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.errors import InvalidRequestError

# the reference's talker sampling defaults (``generate(return_audio=True)``'s ``talker_*`` arguments)
TALKER_DEFAULTS = dict(temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05, max_tokens=4096)


def talker_sampling_params(tokens: TalkerTokens, **overrides) -> SamplingParams:
    """The reference's talker sampling (``generate(return_audio=True)``'s ``talker_*`` defaults: do_sample,
    top_k 40, top_p 0.8, temperature 0.9, repetition_penalty 1.05, max_new_tokens 4096, eos = codec pad /
    end; the codec start token is suppressed by the model), with ``overrides`` (``temperature=0``: greedy,
    as ``talker_do_sample=False``)."""
    kw = TALKER_DEFAULTS | dict(stop_token_ids=tokens.stop_ids, ignore_eos=False, skip_special_tokens=False)
    kw.update(overrides)
    return SamplingParams(**kw)


class TalkerInput:
    """One talker request's inputs, fed from the thinker as it runs (module docstring).

    ``prompt_embeds`` / ``prompt_hidden``: the thinker prompt's token embeddings and final hidden states
    [L, E]; ``media_rows``: bool [L], the placeholder rows whose embedding the reference zeroes (None:
    none); ``speaker_bos`` / ``text_eos`` / ``text_pad``: the thinker's embeddings [E] of the voice's
    bos token, ``tts_text_end_token_id`` and ``tts_text_pad_token_id``; ``positions`` [3, L] and
    ``rope_delta``: the thinker prompt's M-RoPE positions (None for text)."""

    def __init__(self, tokens: TalkerTokens, prompt_embeds: torch.Tensor, prompt_hidden: torch.Tensor,
                 speaker_bos: torch.Tensor, text_eos: torch.Tensor, text_pad: torch.Tensor,
                 media_rows: torch.Tensor | None = None, positions: torch.Tensor | None = None, rope_delta: int = 0):
        if prompt_embeds.shape != prompt_hidden.shape or prompt_embeds.dim() != 2:
            raise InvalidRequestError(f"prompt embeddings {list(prompt_embeds.shape)} and hidden states "
                                      f"{list(prompt_hidden.shape)} must both be [L, E]", param="prompt_embeds")
        e = prompt_embeds
        if media_rows is not None:
            e = e.masked_fill(media_rows.to(torch.bool).unsqueeze(-1), 0.0)
        self.tokens = tokens
        self.L = e.shape[0]
        self._head = prompt_hidden + e                    # the reference's order: hidden + embedding
        self._bos = speaker_bos.reshape(1, -1).to(e.dtype)
        self._eos, self._pad = text_eos.reshape(-1).to(e.dtype), text_pad.reshape(-1).to(e.dtype)
        self._positions, self._rope_delta = positions, rope_delta
        self.embeds: InputEmbeds | None = None            # made by the first add_token
        self._table: torch.Tensor | None = None           # the thinker's embedding table (from_thinker)

    @classmethod
    def from_thinker(cls, tokens: TalkerTokens, embedding: torch.Tensor, prompt_ids: list[int],
                     prompt_hidden: torch.Tensor, speaker_bos: int, media_token_ids: tuple[int, ...] = (),
                     positions: torch.Tensor | None = None, rope_delta: int = 0) -> "TalkerInput":
        """From the thinker's embedding table [V, E] (``embed_tokens.weight``), its prompt token ids and
        final hidden states [L, E]; ``media_token_ids``: the image / audio / video placeholder ids (their
        rows take no embedding). ``add_thinker_token(token_id, hidden)`` then feeds generated tokens."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        media = torch.isin(ids, torch.as_tensor(list(media_token_ids), dtype=torch.long)) if media_token_ids else None
        table = embedding.detach()
        self = cls(tokens, table[ids].to(prompt_hidden.dtype), prompt_hidden, table[speaker_bos],
                   table[tokens.text_eos], table[tokens.text_pad], media, positions, rope_delta)
        self._table = table
        return self

    def add_thinker_token(self, token_id: int | list[int], hidden: torch.Tensor) -> None:
        """``add_token`` by token id (made by ``from_thinker``)."""
        ids = torch.as_tensor(token_id, dtype=torch.long).reshape(-1)
        self.add_token(self._table[ids].to(hidden.dtype), hidden)

    @property
    def token_ids(self) -> list[int]:
        """The talker prompt's codec tokens: mask for each thinker prompt row, then pad and start."""
        t = self.tokens
        return [t.codec_mask] * self.L + [t.codec_pad, t.codec_bos]

    def add_token(self, embed: torch.Tensor, hidden: torch.Tensor) -> None:
        """The next thinker token that was fed to the thinker: its embedding and final hidden state, [E]
        or [n, E] for several."""
        rows = hidden.reshape(-1, hidden.shape[-1]) + embed.reshape(-1, embed.shape[-1])
        if self.embeds is None:
            pos = None
            if self._positions is not None:
                nxt = self._positions.max() + 1
                pos = torch.cat([self._positions, torch.stack([nxt, nxt + 1]).expand(3, 2)], dim=1)
            prompt = torch.cat([self._head, self._bos, rows[:1]])
            self.embeds = InputEmbeds(prompt, closed=False, positions=pos,
                                      rope_delta=self._rope_delta if pos is not None else 0)
            rows = rows[1:]
        if rows.shape[0]:
            self.embeds.push(rows)

    def finish(self) -> None:
        """The thinker is done: the text-end row, then the text-pad row on every later step."""
        if self.embeds is None:
            raise InvalidRequestError("the thinker fed no generated token; the talker needs at least one",
                                      param="thinker_states")
        self.embeds.push(self._eos)
        self.embeds.close(self._pad)

    def prompt(self) -> dict:
        """The talker request's prompt for ``LLMEngine.add_request`` / ``LLM.generate`` (after the first
        ``add_token``): ``{"prompt_embeds": InputEmbeds, "prompt_token_ids": token_ids}``."""
        if self.embeds is None:
            raise InvalidRequestError("the talker starts after the thinker's first generated token",
                                      param="thinker_states")
        return {"prompt_embeds": self.embeds, "prompt_token_ids": self.token_ids}
