"""Media from users (images, audio): hostile until checked.

``sources`` turns what a request carries (a ``data:`` URL, base64, raw bytes, an ``http(s)`` URL
when the config allows fetching) into bytes within a byte budget; ``images`` and ``audio`` decode
those bytes with maintained libraries (Pillow; soundfile + soxr) under pixel / duration limits.
Every refusal is an ``InvalidRequestError`` naming the request field. Limits come from
``omni_ray.config.MediaConfig``.
"""

from omni_ray.media.audio import load_audio
from omni_ray.media.images import load_image
from omni_ray.media.sources import read_source

__all__ = ["load_audio", "load_image", "read_source"]
