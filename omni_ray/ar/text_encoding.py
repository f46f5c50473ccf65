"""Text-encoder recipes: how a diffusers pipeline turns a prompt into the hidden states its DiT is
conditioned on, applied on the AR engine (paged KV, prefix cache, batching) instead of a
transformers forward.

Qwen-Image formats the prompt into a chat template, tokenizes it (truncated to ``max_tokens`` +
``drop_tokens``), runs its Qwen2.5-VL language model and keeps the final (normed) hidden states of
every position after the template's first ``drop_tokens`` tokens; Qwen-Image-Edit does the same
with the source image in the template (the VL processor + vision tower), resized first as the
pipeline resizes it. ``TextEncoding`` holds one such recipe; ``text_encoding_for(pipeline_class)``
looks it up by the diffusers pipeline class (``model_index.json``'s ``_class_name``).

    enc = text_encoding_for("QwenImagePipeline")
    llm.encode(["a fox"], encoding=enc)                         # offline: [T - 34, H] float32 each
    ARRequest("r", prompt="a fox", encoding=enc)                # a stage: ARStageEngine.encode(req)

The dropped positions are the template's shared prefix: the engine needs their K/V but not their
hidden states, so their full blocks come from the prefix cache (``EncodeParams.drop_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

from omni_ray.config import MediaConfig
from omni_ray.errors import InvalidRequestError


@dataclass(frozen=True)
class TextEncoding:
    template: str                      # the prompt goes in place of "{}" (str.format, as the pipelines do)
    drop_tokens: int                   # leading positions whose hidden states are not returned
    max_tokens: int | None = None      # truncation of the formatted prompt to max_tokens + drop_tokens (None: none)
    image: bool = False                # the template holds the model's image placeholder: a request has one image
    image_area: int | None = None      # the image is resized to about this many pixels first (the pipeline's)
    layer: int = -1                    # which hidden states: -1 the final normed ones (``hidden_states[-1]``)

    def text(self, prompt: str) -> str:
        return self.template.format(prompt)

    def prepare_image(self, image):
        """The source image as the pipeline hands it to its processor: resized to the pipeline's area at
        the image's aspect ratio (diffusers' ``calculate_dimensions`` and ``VaeImageProcessor.resize``)."""
        if self.image_area is None:
            return image
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        width, height, _ = calculate_dimensions(self.image_area, image.width / image.height)
        return VaeImageProcessor().resize(image, height, width)

    def inputs(self, tokenizer, processor, prompt: str, image=None, media: MediaConfig | None = None):
        """The engine's prompt: token ids, or (``image`` recipes) a ``MultiModalInputs``. ``image``: the
        image as the user gave it (PIL, bytes, base64 or a data URL; decoded by ``omni_ray.media`` under
        ``media``'s limits); ``processor``: the engine's ``MultiModalProcessor`` (None: a text-only model)."""
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError("prompt must be a non-empty string", param="prompt")
        text = self.text(prompt)
        if not self.image:
            if image is not None:
                raise InvalidRequestError("this text encoder takes no image", param="image")
            if self.max_tokens is None:
                return list(tokenizer(text)["input_ids"])
            return list(tokenizer(text, truncation=True, max_length=self.max_tokens + self.drop_tokens)["input_ids"])
        if processor is None:
            raise InvalidRequestError("this text encoder's template takes an image, but the model has no "
                                      "vision input (no image processor)", param="image")
        if image is None:
            raise InvalidRequestError("this text encoder needs the source image", param="image")
        if isinstance(image, list):
            if len(image) != 1:
                raise InvalidRequestError(f"this text encoder takes one image, got {len(image)}", param="image")
            image = image[0]
        from omni_ray.media import load_image

        image = load_image(image, "image", media or MediaConfig())
        mm = processor(text, images=[self.prepare_image(image)], add_special_tokens=True)
        if self.max_tokens is not None and len(mm.token_ids) > self.max_tokens + self.drop_tokens:
            raise InvalidRequestError(f"prompt with its image has {len(mm.token_ids)} tokens; the text encoder takes "
                                      f"{self.max_tokens + self.drop_tokens}", param="prompt")
        return mm


# the diffusers pipelines' own settings (``prompt_template_encode``, ``prompt_template_encode_start_idx``,
# ``tokenizer_max_length``; tests/ar/test_text_encoding.py checks them against the pipeline objects)
QWEN_IMAGE = TextEncoding(
    template="<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
             "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
             "<|im_start|>assistant\n",
    drop_tokens=34, max_tokens=1024)
QWEN_IMAGE_EDIT = TextEncoding(      # no truncation: the edit pipeline's processor call has none
    template="<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
             "objects, background), then explain how the user's text instruction should alter or modify the "
             "image. Generate a new image that meets the user's requirements while maintaining consistency with "
             "the original input where appropriate.<|im_end|>\n<|im_start|>user\n"
             "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n",
    drop_tokens=64, image=True, image_area=1024 * 1024)

TEXT_ENCODINGS: dict[str, TextEncoding] = {
    "QwenImagePipeline": QWEN_IMAGE,
    "QwenImageEditPipeline": QWEN_IMAGE_EDIT,
}


def text_encoding_for(pipeline_class: str) -> TextEncoding | None:
    """The text-encoder recipe of a diffusers pipeline class, or None when none is known."""
    return TEXT_ENCODINGS.get(pipeline_class)
