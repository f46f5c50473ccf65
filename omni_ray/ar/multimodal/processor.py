"""The checkpoint's own preprocessing for multimodal prompts, without the processor class.

transformers' ``Qwen2_5_VLProcessor`` / ``Qwen2_5OmniProcessor`` cannot be built without
torchvision (their video sub-processor needs it) and CPU wheels of torchvision matching the pinned
CPU torch do not exist; so this class holds what the processor holds — the image processor
(``AutoImageProcessor``: the PIL backend when torchvision is absent, the same resize/normalise
rules), the audio feature extractor (``AutoFeatureExtractor``, Whisper's log-mel) and the tokenizer
with its chat template — and expands the placeholders as the processor does (an image: one token
per ``merge_size``² patches; an audio clip: its feature length after the two stride-2 convolutions
and the pooling). tests/ar/test_mm_processor.py checks the result equals the processor class's.
Videos are not accepted yet.
"""

from __future__ import annotations

import numpy as np
import torch

from omni_ray.ar.models.mrope import MRopeSpec, mrope_positions
from omni_ray.ar.multimodal.inputs import MediaItem, MultiModalInputs
from omni_ray.errors import ConfigError, InvalidRequestError


def audio_output_lengths(frames: torch.Tensor) -> torch.Tensor:
    """Audio tokens of clips with ``frames`` mel frames (conv stride 2, then 2x average pooling)."""
    frames = (frames - 1) // 2 + 1
    return (frames - 2) // 2 + 1


class MultiModalProcessor:
    """``proc(text, images=[PIL], audios=[float32 16 kHz])`` -> ``MultiModalInputs``; ``text`` holds one
    placeholder token per item (what the chat template writes for an image / audio content part)."""

    def __init__(self, tokenizer, spec: MRopeSpec, image_processor=None, feature_extractor=None):
        self.tokenizer, self.spec = tokenizer, spec
        self.image_processor, self.feature_extractor = image_processor, feature_extractor
        tok = tokenizer.convert_ids_to_tokens
        self.image_token = tok(spec.image_token_id)
        self.audio_token = tok(spec.audio_token_id) if spec.audio_token_id is not None else None

    @classmethod
    def from_pretrained(cls, path, tokenizer=None) -> "MultiModalProcessor | None":
        """From a model path or its ``CheckpointLayout`` (``omni_ray.ar.models.checkpoint``: the config in
        the weights folder, the image processor settings in the processor folder); None for a text-only
        family, and for a diffusers pipeline that ships no image processor (Qwen-Image: text only)."""
        from omni_ray.ar.models.checkpoint import CheckpointLayout, checkpoint_layout
        from omni_ray.ar.models.loader import read_hf_config

        layout = path if isinstance(path, CheckpointLayout) else checkpoint_layout(path)
        spec = MRopeSpec.from_hf(read_hf_config(layout.weights))
        if spec is None:
            return None
        # only now: importing transformers' processor modules takes ~2 s of CPU, wasted on a text-only model
        from transformers import AutoFeatureExtractor, AutoImageProcessor

        folder = layout.processor
        if not (folder / "preprocessor_config.json").is_file():
            if layout.pipeline is not None:
                return None
            raise ConfigError(f"{folder}: a {spec.family} checkpoint needs preprocessor_config.json (its image "
                              "processor settings)")
        tokenizer = tokenizer or layout.load_tokenizer()
        image = AutoImageProcessor.from_pretrained(folder)
        audio = AutoFeatureExtractor.from_pretrained(folder) if spec.audio_token_id is not None else None
        return cls(tokenizer, spec, image, audio)

    @property
    def modalities(self) -> list[str]:
        return ["text", "image"] + (["audio"] if self.feature_extractor is not None else [])

    @property
    def sampling_rate(self) -> int:
        return int(getattr(self.feature_extractor, "sampling_rate", 16000))

    # ------------------------------------------------------------------ per item
    def image_item(self, image) -> MediaItem:
        out = self.image_processor(images=[image], return_tensors="pt")
        grid = out["image_grid_thw"]                                  # [1, 3] patches
        n = int(grid.prod()) // self.image_processor.merge_size ** 2
        return MediaItem("image", -1, n, {"pixel_values": out["pixel_values"], "image_grid_thw": grid})

    def audio_item(self, wave: np.ndarray) -> MediaItem:
        if self.feature_extractor is None:
            raise InvalidRequestError("this model does not take audio", param="audio")
        out = self.feature_extractor([wave], sampling_rate=self.sampling_rate, padding="max_length",
                                     return_attention_mask=True, return_tensors="pt")
        mask = out["attention_mask"]                                  # [1, frames]
        n = int(audio_output_lengths(mask.sum(-1))[0])
        return MediaItem("audio", -1, n, {"input_features": out["input_features"], "feature_attention_mask": mask})

    # ------------------------------------------------------------------ the prompt
    def __call__(self, text: str, images: list | None = None, audios: list | None = None,
                 add_special_tokens: bool = False) -> MultiModalInputs:
        images, audios = list(images or []), list(audios or [])
        if audios and self.audio_token is None:
            raise InvalidRequestError("this model does not take audio", param="audio")
        pending = {"image": [self.image_item(im) for im in images], "audio": [self.audio_item(a) for a in audios]}
        marks = {self.image_token: "image"} | ({self.audio_token: "audio"} if self.audio_token else {})
        pieces, order = _split(text, marks)
        for kind, items in pending.items():
            found = order.count(kind)
            if found != len(items):
                raise InvalidRequestError(f"the prompt has {found} {kind} placeholder(s) for {len(items)} "
                                          f"{kind}(s)", param="multi_modal_data")
        queues = {k: iter(v) for k, v in pending.items()}
        ids: list[int] = []
        items: list[MediaItem] = []
        token_of = {"image": self.spec.image_token_id, "audio": self.spec.audio_token_id}
        for i, piece in enumerate(pieces):
            if piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=add_special_tokens and i == 0)
            if i < len(order):
                item = next(queues[order[i]])
                item.offset = len(ids)
                ids += [token_of[item.kind]] * item.length
                items.append(item)
        grids = [it.inputs["image_grid_thw"] for it in items if it.kind == "image"]
        pos, delta = mrope_positions(torch.tensor(ids), self.spec, torch.cat(grids) if grids else None)
        return MultiModalInputs(ids, items, pos, delta)


def _split(text: str, marks: dict[str, str]) -> tuple[list[str], list[str]]:
    """``text`` cut at each placeholder token: (len(order) + 1 text pieces, the placeholders' kinds)."""
    pieces, order, rest = [], [], text
    while True:
        hits = [(rest.find(m), m) for m in marks if m in rest]
        if not hits:
            pieces.append(rest)
            return pieces, order
        at, m = min(hits)
        pieces.append(rest[:at])
        order.append(marks[m])
        rest = rest[at + len(m):]
