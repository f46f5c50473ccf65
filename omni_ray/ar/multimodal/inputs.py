"""What a multimodal prompt is once processed: token ids, media items, positions."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch


def content_hash(kind: str, *tensors: torch.Tensor) -> str:
    """sha256 of an item's encoder inputs (dtype, shape and bytes): equal hashes, equal encoder outputs."""
    h = hashlib.sha256(kind.encode())
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class MediaItem:
    """One image or audio clip of a prompt."""

    kind: str                               # "image" | "audio"
    offset: int                             # index of its first placeholder token in the prompt
    length: int                             # its placeholder tokens = rows of its encoder output
    inputs: dict[str, torch.Tensor]         # image: pixel_values [P, C*T*p*p], image_grid_thw [1, 3];
                                            # audio: input_features [1, mel, frames], feature_attention_mask [1, frames]
    hash: str = ""
    embedding: torch.Tensor | None = None   # its encoder output [length, hidden], computed elsewhere (an encoder
                                            # stage): the engine takes it instead of running a tower

    def without_inputs(self, embedding: torch.Tensor) -> "MediaItem":
        """This item with its encoder output and without the encoder inputs (what an engine without
        towers needs: the hash, placement and rows; pixels and features stay behind)."""
        return dataclasses.replace(self, inputs={}, embedding=embedding)

    def __post_init__(self):
        if not self.hash:
            self.hash = content_hash(self.kind, *(self.inputs[k] for k in sorted(self.inputs)))

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class MultiModalInputs:
    """A processed prompt: ``token_ids`` [T], ``items`` in prompt order, ``positions`` [3, T] and the
    decode offset ``rope_delta`` (a token at index i >= T has position i + rope_delta)."""

    token_ids: list[int]
    items: list[MediaItem] = field(default_factory=list)
    positions: torch.Tensor | None = None
    rope_delta: int = 0

    def media_hashes(self) -> list[tuple[int, str]]:
        """(offset, hash) of every item: what the prefix cache mixes into the block hashes."""
        return [(it.offset, it.hash) for it in self.items]
