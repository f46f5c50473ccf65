"""Multimodal prompts for the AR engine (Qwen2.5-VL, the Qwen2.5-Omni thinker).

``MultiModalProcessor`` (the checkpoint's own image processor and audio feature extractor, its
tokenizer and chat template) turns a prompt plus images / audio into ``MultiModalInputs``: token
ids with each placeholder expanded to as many tokens as the encoder gives rows, one
``MediaItem`` per image / clip (encoder inputs, content hash, where its tokens sit), and the
M-RoPE / TMRoPE positions. The engine runs the encoders on the items and splices their outputs at
the items' token ranges.
"""

from omni_ray.ar.multimodal.inputs import MediaItem, MultiModalInputs
from omni_ray.ar.multimodal.processor import MultiModalProcessor

__all__ = ["MediaItem", "MultiModalInputs", "MultiModalProcessor"]
