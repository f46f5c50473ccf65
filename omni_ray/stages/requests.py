"""Typed stage requests: what the ingress (or ``OmniLLM``) sends a stage, built once per request
and sent over Ray as they are (plain picklable dataclasses; ``__post_init__`` checks them where
they are built, not again where they arrive).

A request carries its id, its inputs by modality and its params:

    ARRequest(request_id, prompt="a fox" | [ids] | None, messages=[...] | None, system_prompt=None,
              params=SamplingParams(...), layer=None, multi_modal_data=None, tools=None, encoding=None)
    DiTRequest(request_id, prompt="a fox" | None, params=DiffusionParams(...), conditioning=Handoff | None,
               negative_conditioning=Handoff | None, image=ImageInput | None)

``multi_modal_data`` ({"image": ..., "audio": ...}, vLLM's name, with a text prompt) or chat
``messages`` with image / audio content parts carry media to an AR stage whose model takes them;
``Handoff`` (hidden states of another stage, by object-store reference or by value) carries a
stage's output to the next; ``ImageInput`` carries the request's own image (image edit) to every
stage that takes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.ar.text_encoding import TextEncoding
from omni_ray.dit.params import DiffusionParams
from omni_ray.errors import InvalidRequestError
from omni_ray.rules import check_prompt


@dataclass
class Handoff:
    """Hidden states passed from one stage to the next: ``ref`` (an ObjectRef, online: resolved
    only by the consuming replica) or ``tensor`` (offline, [T, H]). A stream's rows (an AR delta's
    ``hidden_states``) come as one Handoff per delta; deltas merged on the way hold them ``join``ed:
    ``ref`` a list of ObjectRefs (``refs``: their rows in order), or one tensor."""

    shape: list[int]
    ref: Any = None
    tensor: Any = None
    span: tuple[int, int] | None = None   # by reference: rows [start, stop) of what ``ref`` holds (``rows``)
    dtype: str | None = None
    object_id: str | None = None
    source: dict | None = None            # what they are a function of (model, input digest): cache keys
    cache: str | None = None              # the ingress's DiT cache: "hit" | "miss" | "off"

    @property
    def refs(self) -> list:
        """The object-store references of its rows, in row order (none when it holds them by value)."""
        return [] if self.ref is None else list(self.ref) if isinstance(self.ref, list) else [self.ref]

    @classmethod
    def join(cls, parts: list["Handoff"]) -> "Handoff":
        """Consecutive row blocks of one stream as one Handoff: [sum of n, H]; by value the tensors
        concatenated, by reference ``ref`` the list of the parts' references."""
        if len(parts) == 1:
            return parts[0]
        if any(p.span is not None for p in parts):      # rows of a reference: only the consumer cuts them
            raise ValueError("cannot join hand-offs that are rows of a reference (span)")
        shape = [sum(p.shape[0] for p in parts), *parts[0].shape[1:]]
        if all(p.tensor is not None for p in parts):
            import torch

            return cls(shape, tensor=torch.cat([p.tensor for p in parts]), dtype=parts[0].dtype)
        return cls(shape, ref=[r for p in parts for r in p.refs], dtype=parts[0].dtype)

    def public(self) -> dict:
        """Plain data for responses and stage timings (never the ref or the tensor)."""
        out = {"shape": list(self.shape), "dtype": self.dtype, "object_id": self.object_id,
               "source": self.source, "cache": self.cache}
        return {k: v for k, v in out.items() if v is not None}

    def rows(self, start: int, stop: int | None = None) -> "Handoff":
        """Rows [start, stop) of these hidden states, without resolving them (a runner splitting a thinker's
        streamed rows between the talker's prompt and its feeds): by value a slice of the tensor, by
        reference the same references and the ``span``, cut where they are resolved (``resolve``)."""
        n = self.shape[0]
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise ValueError(f"rows [{start}, {stop}) of a hand-off of {n} rows")
        shape = [stop - start, *self.shape[1:]]
        if self.ref is None:
            return Handoff(shape, tensor=None if self.tensor is None else self.tensor[start:stop], dtype=self.dtype)
        base = self.span[0] if self.span else 0
        return Handoff(shape, ref=self.ref, span=(base + start, base + stop), dtype=self.dtype)

    async def resolve(self):
        """The rows as a CPU tensor: by value, or fetched from the object store (by the consuming replica: the
        only place they are resolved), several references concatenated in order, cut to ``span``."""
        import warnings

        import torch

        if self.tensor is not None:
            return torch.as_tensor(self.tensor)
        if self.ref is None:
            raise InvalidRequestError("a hand-off carries neither a tensor nor a reference", param="hidden")
        refs = self.ref if isinstance(self.ref, list) else [self.ref]
        with warnings.catch_warnings():        # the store's buffers are read-only; consumers copy what they keep
            warnings.simplefilter("ignore", UserWarning)
            parts = [torch.as_tensor(x) for x in await asyncio.gather(*refs)]
        t = parts[0] if len(parts) == 1 else torch.cat(parts)
        return t if self.span is None else t[self.span[0]:self.span[1]]


@dataclass
class ARRequest:
    request_id: str
    prompt: str | list[int] | None = None          # text, or token ids
    messages: list[dict] | None = None             # chat messages (the model's chat template)
    system_prompt: str | None = None               # wraps ``prompt`` as a user turn after this system turn
    params: SamplingParams = field(default_factory=SamplingParams)
    layer: int | None = None                       # encode(): which layer's hidden states (None: the last)
    multi_modal_data: dict[str, Any] | None = None  # {"image": ..., "audio": ...}: for stages that take them
    echo: bool = False                             # the first delta carries the prompt as text (completions' echo)
    tools: list[dict] | None = None                # OpenAI ``tools``: rendered by the chat template (messages only)
    encoding: TextEncoding | None = None           # encode(): a text-encoder recipe (omni_ray.ar.text_encoding) over
                                                   # ``prompt`` (+ multi_modal_data {"image": ...} for image recipes)

    def __post_init__(self):
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
        if not isinstance(self.params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(self.params).__name__}",
                                      param="params")
        if self.messages is not None:
            if self.prompt is not None:
                raise InvalidRequestError("give exactly one of prompt and messages", param="prompt")
            if not isinstance(self.messages, list) or not self.messages:
                raise InvalidRequestError("messages is empty", param="messages")
        else:
            check_prompt(self.prompt)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise InvalidRequestError("system_prompt must be a string", param="system_prompt")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise InvalidRequestError(f"layer must be an integer, got {self.layer!r}", param="layer")
        if self.tools is not None and (self.messages is None or not isinstance(self.tools, list)):
            raise InvalidRequestError("tools need chat messages and must be a list", param="tools")
        if self.multi_modal_data is not None:
            if not isinstance(self.multi_modal_data, dict) or set(self.multi_modal_data) - {"image", "audio"}:
                raise InvalidRequestError("multi_modal_data must be a dict with 'image' and / or 'audio'",
                                          param="multi_modal_data")
            if self.multi_modal_data and not isinstance(self.prompt, str):
                raise InvalidRequestError("multi_modal_data goes with a text prompt holding the model's "
                                          "placeholder tokens", param="multi_modal_data")
        if self.tools and self.has_media:
            raise InvalidRequestError("tools with image or audio content are not supported yet", param="tools")
        if self.encoding is not None:
            self._check_encoding()

    def _check_encoding(self) -> None:
        if not isinstance(self.encoding, TextEncoding):
            raise InvalidRequestError(f"encoding must be a TextEncoding, got {type(self.encoding).__name__}",
                                      param="encoding")
        if not isinstance(self.prompt, str) or self.messages is not None or self.system_prompt or self.tools:
            raise InvalidRequestError("a text-encoder request takes a text prompt (the recipe's template wraps "
                                      "it), no messages, system_prompt or tools", param="prompt")
        if self.multi_modal_data and set(self.multi_modal_data) != {"image"}:
            raise InvalidRequestError("a text-encoder request takes an image only", param="multi_modal_data")

    @property
    def is_plain_text(self) -> bool:
        """A text prompt used as it is (no chat template): what a batch can tokenize at once."""
        return isinstance(self.prompt, str) and self.messages is None and not self.system_prompt \
            and not self.multi_modal_data

    @property
    def has_media(self) -> bool:
        from omni_ray.ar.multimodal.prompts import has_media

        return bool(self.multi_modal_data) or (self.messages is not None and has_media(self.messages))

    def input_digest(self) -> str:
        """What this request's prompt hidden states are a function of (cache keys, handoff source)."""
        parts = [self.prompt, self.messages, self.system_prompt, self.layer] + ([self.tools] if self.tools else [])
        if self.encoding is not None:
            parts.append(dataclasses.asdict(self.encoding))
        if self.multi_modal_data:
            parts.append(media_digest(self.multi_modal_data))
        return json.dumps(parts, sort_keys=True, default=repr)


def media_digest(data: dict) -> dict:
    """``multi_modal_data`` by content: a sha256 per image / clip (PIL pixels, bytes, or the string given)."""
    def one(x) -> str:
        h = hashlib.sha256()
        if hasattr(x, "tobytes") and hasattr(x, "mode"):           # a PIL image
            h.update(f"{x.mode}{x.size}".encode())
            h.update(x.tobytes())
        elif isinstance(x, (bytes, bytearray)):
            h.update(bytes(x))
        elif isinstance(x, tuple) and len(x) == 2 and hasattr(x[0], "tobytes"):   # audio (array, rate)
            h.update(f"{x[1]}".encode())
            h.update(x[0].tobytes())
        else:
            h.update(repr(x).encode())
        return h.hexdigest()

    return {k: [one(x) for x in (v if isinstance(v, list) else [v])] for k, v in sorted(data.items())}


@dataclass
class ImageInput:
    """A request's input image (image edit), checked once where the request came in: ``ref`` (online:
    an ObjectRef of its encoded bytes, put once by the ingress and resolved only in the stage replicas
    that use it) or ``image`` (offline: the PIL image). ``digest``: sha256 of its RGB pixels and size,
    the same online and offline (cache keys: the DiT cache keys conditioning and images by it)."""

    digest: str
    size: tuple[int, int]                 # (width, height)
    ref: Any = None
    image: Any = None

    @classmethod
    def of(cls, image, ref: Any = None, keep: bool = True) -> "ImageInput":
        """``image`` (PIL, RGB, already checked) with its digest; ``keep=False`` keeps only ``ref``."""
        h = hashlib.sha256(f"{image.width}x{image.height}:".encode())
        h.update(image.tobytes())
        return cls(h.hexdigest()[:32], (image.width, image.height), ref=ref, image=image if keep else None)

    def __repr__(self) -> str:            # what digests of the requests that carry it read (never the pixels)
        return f"ImageInput(sha256:{self.digest}, {self.size[0]}x{self.size[1]})"

    def public(self) -> dict:
        return {"digest": self.digest, "size": list(self.size)}


@dataclass
class DiTRequest:
    request_id: str
    prompt: str | None = None
    params: DiffusionParams = field(default_factory=DiffusionParams)
    conditioning: Handoff | None = None            # an AR stage's prompt hidden states, used instead of the prompt
    negative_conditioning: Handoff | None = None   # ... and of the negative prompt (true CFG), encoded beside it
    image: ImageInput | None = None                # the input image of an edit (the engine VAE-encodes it)
    fps: int | None = None                         # video models: frames per second of the MP4 the replica encodes

    def __post_init__(self):
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
        if not isinstance(self.params, DiffusionParams):
            raise InvalidRequestError(f"params must be DiffusionParams, got {type(self.params).__name__}",
                                      param="params")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidRequestError("prompt must be a string", param="prompt")
        for name in ("conditioning", "negative_conditioning"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), Handoff):
                raise InvalidRequestError(f"{name} must be a Handoff", param=name)
        if self.negative_conditioning is not None and self.conditioning is None:
            raise InvalidRequestError("negative_conditioning goes with conditioning", param="negative_conditioning")
        if self.image is not None and not isinstance(self.image, ImageInput):
            raise InvalidRequestError("image must be an ImageInput", param="image")
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, int) or self.fps < 1):
            raise InvalidRequestError(f"fps must be a positive integer, got {self.fps!r}", param="fps")


# ----------------------------------------------------------------------------- speech (Qwen2.5-Omni)
@dataclass
class TalkerRequest:
    """A talker stage's request (speech out): the thinker prompt's token ids and final hidden states
    ``prompt_hidden`` ([L, E], a Handoff), M-RoPE ``positions`` [3, L] / ``rope_delta`` when the prompt
    had media, the voice (its ``bos_token`` in spk_dict.pt). The thinker's generated tokens come after,
    by ``feed(request_id, ThinkerRows)``; ``params``: the talker's sampling (codec stop tokens added by
    the stage)."""

    request_id: str
    voice: str
    params: SamplingParams
    prompt_ids: list[int]
    prompt_hidden: Handoff
    positions: Any = None                          # torch.Tensor [3, L] | None
    rope_delta: int = 0

    def __post_init__(self):
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
        if not isinstance(self.voice, str) or not self.voice:
            raise InvalidRequestError("voice must be a non-empty string", param="voice")
        if not isinstance(self.params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(self.params).__name__}",
                                      param="params")
        if not isinstance(self.prompt_ids, list) or not self.prompt_ids:
            raise InvalidRequestError("prompt_ids must be a non-empty list of token ids", param="prompt_ids")
        if not isinstance(self.prompt_hidden, Handoff) or self.prompt_hidden.shape[:1] != [len(self.prompt_ids)]:
            raise InvalidRequestError("prompt_hidden must be a Handoff of [len(prompt_ids), E] hidden states",
                                      param="prompt_hidden")


@dataclass
class ThinkerRows:
    """A feed of the thinker's generated tokens to a talker request: their ids and final hidden states
    (``hidden`` [len(token_ids), E], a Handoff; None when no token came). ``finished=True`` ends the
    thinker's part (its last token, never fed to the thinker, has no state and is not sent)."""

    token_ids: list[int]
    hidden: Handoff | None = None
    finished: bool = False

    def __post_init__(self):
        n = len(self.token_ids)
        if n and (self.hidden is None or self.hidden.shape[:1] != [n]):
            raise InvalidRequestError(f"hidden must be a Handoff of [{n}, E] rows", param="hidden")


@dataclass
class SpeechRequest:
    """A token2wav stage's request: the utterance's voice and ``params`` (DiffusionParams: ``seed`` draws the
    stream's noise, ``num_inference_steps`` / ``guidance_scale`` the reference's ``num_steps`` / guidance).
    The codec tokens come by ``feed(request_id, codes, finished)``."""

    request_id: str
    voice: str
    params: DiffusionParams = field(default_factory=DiffusionParams)

    def __post_init__(self):
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
        if not isinstance(self.voice, str) or not self.voice:
            raise InvalidRequestError("voice must be a non-empty string", param="voice")
        if not isinstance(self.params, DiffusionParams):
            raise InvalidRequestError(f"params must be DiffusionParams, got {type(self.params).__name__}",
                                      param="params")
