"""Which folder of a model directory holds what the AR engine loads: the one place that decides.

An HF model directory holds everything at its root: ``config.json`` + safetensors (the weights),
the tokenizer files with the chat template and, for multimodal models, ``preprocessor_config.json``.

A diffusers pipeline directory (``model_index.json``, e.g. Qwen-Image's) keeps its language model
as a component: the weights in ``text_encoder/``, the tokenizer in ``tokenizer/`` and, when the
pipeline has one, the processor files (image processor settings, chat template) in ``processor/``.
Such a directory is an AR model path as it is: the engine runs its ``text_encoder`` (any
architecture the engine runs; another one is refused by ``ArchConfig.from_hf``).

    layout = checkpoint_layout("/models/Qwen-Image")    # or "tiny:qwen-image", or an HF directory
    layout.weights, layout.tokenizer, layout.processor, layout.pipeline
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omni_ray.errors import ConfigError

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class CheckpointLayout:
    root: Path                      # the model directory as given (tiny: / shape: generated)
    weights: Path                   # config.json + safetensors of the language model (and its media towers)
    tokenizer: Path                 # tokenizer files
    processor: Path                 # preprocessor_config.json / chat template of a multimodal model
    pipeline: str | None = None     # the diffusers pipeline class (model_index.json ``_class_name``), if any

    def load_tokenizer(self):
        """The tokenizer; its chat template from ``processor/`` when the tokenizer folder has none."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.tokenizer), trust_remote_code=False)
        if getattr(tok, "chat_template", None) is None and self.processor != self.tokenizer:
            template = chat_template_of(self.processor)
            if template is not None:
                tok.chat_template = template
        return tok


def chat_template_of(folder: Path) -> str | None:
    """A chat template saved beside a processor (``chat_template.jinja``, or ``chat_template.json``)."""
    for name in TEMPLATE_FILES:
        f = folder / name
        if f.is_file():
            text = f.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def checkpoint_layout(path: str | Path) -> CheckpointLayout:
    """The layout of a model path (a directory, or a ``tiny:`` / ``shape:`` name, generated once)."""
    from omni_ray.testing import resolve_model

    root = resolve_model(path)
    index = root / "model_index.json"
    if not index.is_file():
        return CheckpointLayout(root, root, root, root)
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{index}: not valid JSON ({err})") from None
    pipeline = components.get("_class_name")
    weights = root / "text_encoder"
    if "text_encoder" not in components or not (weights / "config.json").is_file():
        raise ConfigError(f"{root} is a diffusers directory ({pipeline}) without a text_encoder/ component "
                          "with a config.json: nothing the AR engine can run")
    tokenizer = next((root / c for c in ("tokenizer", "processor") if (root / c).is_dir()), weights)
    processor = root / "processor" if (root / "processor").is_dir() else tokenizer
    return CheckpointLayout(root, weights, tokenizer, processor, pipeline)
