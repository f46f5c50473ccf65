"""Decode a user's image with Pillow, refusing decompression bombs before decoding pixels."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from omni_ray.config import MediaConfig
from omni_ray.errors import InvalidRequestError
from omni_ray.media.sources import read_source

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")      # what a chat client sends; no TIFF/PSD/EPS parsers


def check_size(width: int, height: int, param: str, cfg: MediaConfig) -> None:
    if width < 1 or height < 1:
        raise InvalidRequestError(f"{param}: the image is empty ({width}x{height})", param=param)
    if width * height > cfg.max_image_pixels:
        raise InvalidRequestError(f"{param}: the image is {width}x{height} = {width * height} pixels; the limit is "
                                  f"app.media.max_image_pixels = {cfg.max_image_pixels}", param=param)


def decode_image(data: bytes, param: str, cfg: MediaConfig) -> Image.Image:
    """RGB image from encoded bytes; the header's size is checked before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            check_size(*img.size, param, cfg)
            img.seek(0)                                  # animated GIF / WebP: the first frame
            img.load()
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequestError(f"{param}: the image has too many pixels to decode (limit: "
                                  f"app.media.max_image_pixels = {cfg.max_image_pixels})", param=param) from None
    except Exception as e:                               # PIL raises many types for corrupt files
        raise InvalidRequestError(f"{param}: not a decodable image ({', '.join(FORMATS)}): {type(e).__name__}",
                                  param=param) from None
    return img.convert("RGB")


def load_image(ref: str | bytes | Image.Image, param: str, cfg: MediaConfig) -> Image.Image:
    """An RGB image from a data URL, base64, bytes, (an allowed URL) or a PIL image (offline callers)."""
    if isinstance(ref, Image.Image):
        check_size(*ref.size, param, cfg)
        return ref.convert("RGB")
    data, mime = read_source(ref, param, cfg, cfg.max_image_bytes)
    if mime and not mime.startswith("image/"):
        raise InvalidRequestError(f"{param}: expected an image, the data URL says {mime!r}", param=param)
    return decode_image(data, param, cfg)
