"""The media encoders of a multimodal checkpoint (vision tower, audio tower) beside the decoder,
and the cache of their outputs keyed by content hash.

A step's prefill chunks name the media items whose placeholder tokens they compute; ``embeds``
encodes the ones not cached — batched across requests, one tower call per kind — and returns the
rows to splice into the decoder's input embeddings. The same image in two requests (or a chunked
prompt coming back for the rest of an image) is encoded once while it stays in the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from omni_ray.ar.multimodal.inputs import MediaItem
from omni_ray.errors import InvalidRequestError


class EncoderCache:
    """content hash -> encoder output [tokens, hidden] on the device, LRU, within ``capacity`` rows.
    Entries used by the current step are never evicted by it (a step may go over capacity)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.rows = 0
        self.hits = self.misses = 0

    def __contains__(self, h: str) -> bool:
        return h in self.entries

    def get(self, h: str) -> torch.Tensor:
        self.entries.move_to_end(h)
        return self.entries[h]

    def put(self, h: str, value: torch.Tensor, keep: set[str]) -> None:
        self.entries[h] = value
        self.rows += value.shape[0]
        for old in list(self.entries):
            if self.rows <= self.capacity:
                break
            if old not in keep:
                self.rows -= self.entries.pop(old).shape[0]


class MediaEncoders:
    """The towers a checkpoint has (``visual`` for images, ``audio_tower`` for audio), on one device.
    ``towers=False`` (the towers run in an encoder stage of their own): no tower is loaded and every
    item comes with its ``embedding``, which goes into the cache as a tower's output would."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype, cache_rows: int,
                 towers: bool = True):
        from omni_ray.ar.models.loader import read_hf_config
        from omni_ray.ar.models.qwen2_5_omni_audio import load_audio_tower
        from omni_ray.ar.models.qwen2_5_vl_vision import load_vision_tower

        self.device, self.dtype, self.towers = device, dtype, towers
        mt = read_hf_config(path).get("model_type")
        self.vision = load_vision_tower(path, dtype, device) if towers else None
        self.audio = load_audio_tower(path, dtype, device) if towers and mt in (
            "qwen2_5_omni", "qwen2_5_omni_thinker") else None
        self.cache = EncoderCache(cache_rows)
        self.encoded_items = 0                  # items run through a tower (misses), for stats and tests
        self.received_items = 0                 # items whose embedding came with them (towers=False)

    def outputs(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """The encoder outputs of ``items`` [length, hidden] each, on the CPU (an encoder stage's answer):
        cached ones reused, the others encoded in one tower call per kind."""
        self.ensure(items)
        return [self.cache.get(it.hash).cpu() for it in items]

    @torch.inference_mode()
    def _encode(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """Encoder outputs of ``items`` (one kind), one tower call: [item.length, hidden] each."""
        dev = self.device
        if items[0].kind == "image":
            pixels = torch.cat([it.inputs["pixel_values"] for it in items]).to(dev, self.dtype)
            grid = torch.cat([it.inputs["image_grid_thw"] for it in items])
            out = self.vision(pixels, grid.to(dev))
        else:
            feats = [it.inputs["input_features"] for it in items]
            masks = [it.inputs["feature_attention_mask"] for it in items]
            width = max(f.shape[-1] for f in feats)
            feats = torch.cat([torch.nn.functional.pad(f, (0, width - f.shape[-1])) for f in feats])
            masks = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[-1])) for m in masks])
            out = self.audio(feats.to(dev, self.dtype), masks.to(dev))
        want = [it.length for it in items]
        if out.shape[0] != sum(want):
            raise RuntimeError(f"{items[0].kind} encoder gave {out.shape[0]} rows for {sum(want)} placeholder tokens")
        self.encoded_items += len(items)
        return list(out.split(want))

    def ensure(self, items: list[MediaItem]) -> None:
        """Encode the items not in the cache (each distinct content once), batched per kind; an item
        that carries its ``embedding`` is taken as it is."""
        keep = {it.hash for it in items}
        missing: dict[str, MediaItem] = {}
        for it in items:
            if it.hash in self.cache:
                self.cache.hits += 1
            elif it.hash not in missing:
                self.cache.misses += 1
                missing[it.hash] = it
        given = [it for it in missing.values() if it.embedding is not None]
        for it in given:
            self.cache.put(it.hash, it.embedding.to(self.device, self.dtype), keep)
        self.received_items += len(given)
        for kind in ("image", "audio"):
            todo = [it for it in missing.values() if it.kind == kind and it.embedding is None]
            if todo:
                if (self.vision if kind == "image" else self.audio) is None:
                    raise InvalidRequestError(f"this engine has no {kind} encoder and the {kind} came without "
                                              "its embedding", param="multi_modal_data")
                for it, value in zip(todo, self._encode(todo)):
                    self.cache.put(it.hash, value, keep)

    def embeds(self, chunks: list[tuple[int, object, int, int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``chunks``: (first flat row, sequence, start, n) of each prefill chunk of a multimodal
        sequence -> (rows [M], values [M, hidden]) for the placeholder tokens they compute."""
        need = [(row0, start, n, it) for row0, seq, start, n in chunks
                for it in seq.mm.items if it.offset < start + n and it.end > start]
        if not need:
            return None
        self.ensure([it for *_, it in need])
        rows, values = [], []
        for row0, start, n, it in need:
            lo, hi = max(it.offset, start), min(it.end, start + n)
            rows.append(torch.arange(row0 + lo - start, row0 + hi - start))
            values.append(self.cache.get(it.hash)[lo - it.offset:hi - it.offset])
        return torch.cat(rows).to(self.device), torch.cat(values)
