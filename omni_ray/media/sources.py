"""Bytes from a media reference: ``data:`` URLs and bare base64 always; ``http(s)`` URLs only
when ``MediaConfig.allow_url_fetch`` is on (and then only from ``allowed_domains`` when that is
set, with a timeout and the byte budget enforced while reading); ``file:`` URLs only under
``allowed_local_media_path`` (symlinks resolved first); every other scheme never."""

from __future__ import annotations

import base64
import binascii
from urllib.parse import urlsplit

from omni_ray.config import MediaConfig
from omni_ray.errors import InvalidRequestError


def _b64(text: str, param: str, max_bytes: int) -> bytes:
    if len(text) * 3 // 4 > max_bytes + 3:
        raise InvalidRequestError(f"{param}: the media is over the {max_bytes} byte limit", param=param)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{param}: not valid base64", param=param) from None


def _data_url(url: str, param: str, max_bytes: int) -> tuple[bytes, str]:
    """``data:<mime>[;base64],<payload>`` -> (bytes, mime)."""
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise InvalidRequestError(f"{param}: a data URL needs a ',' before its payload", param=param)
    mime, *opts = head.split(";")
    if "base64" not in opts:
        raise InvalidRequestError(f"{param}: only base64 data URLs are accepted", param=param)
    return _b64(payload.strip(), param, max_bytes), mime.lower()


def _fetch(url: str, param: str, cfg: MediaConfig, max_bytes: int) -> tuple[bytes, str]:
    host = (urlsplit(url).hostname or "").lower()
    if cfg.allowed_domains and not any(host == d or host.endswith("." + d) for d in cfg.allowed_domains):
        raise InvalidRequestError(f"{param}: host {host!r} is not in app.media.allowed_domains", param=param)
    import httpx

    try:
        with httpx.stream("GET", url, timeout=cfg.fetch_timeout_s, follow_redirects=False) as r:
            if r.status_code != 200:
                raise InvalidRequestError(f"{param}: fetching the URL gave HTTP {r.status_code}", param=param)
            chunks, size = [], 0
            for chunk in r.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidRequestError(f"{param}: the media is over the {max_bytes} byte limit", param=param)
                chunks.append(chunk)
            return b"".join(chunks), r.headers.get("content-type", "").split(";")[0].lower()
    except httpx.HTTPError as e:
        raise InvalidRequestError(f"{param}: could not fetch the URL ({type(e).__name__})", param=param) from None


def _local(url: str, param: str, cfg: MediaConfig, max_bytes: int) -> tuple[bytes, str]:
    from pathlib import Path
    from urllib.parse import unquote

    if not cfg.allowed_local_media_path:
        raise InvalidRequestError(f"{param}: this server reads no local files (app.media.allowed_local_media_path "
                                  "is not set)", param=param)
    root = Path(cfg.allowed_local_media_path).resolve()
    path = Path(unquote(urlsplit(url).path)).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise InvalidRequestError(f"{param}: not a file under app.media.allowed_local_media_path", param=param)
    if path.stat().st_size > max_bytes:
        raise InvalidRequestError(f"{param}: the media is over the {max_bytes} byte limit", param=param)
    return path.read_bytes(), ""


def read_source(ref: str | bytes, param: str, cfg: MediaConfig, max_bytes: int) -> tuple[bytes, str]:
    """(bytes, mime type or "") of a media reference, within ``max_bytes``."""
    if isinstance(ref, (bytes, bytearray)):
        if len(ref) > max_bytes:
            raise InvalidRequestError(f"{param}: the media is over the {max_bytes} byte limit", param=param)
        return bytes(ref), ""
    if not isinstance(ref, str) or not ref:
        raise InvalidRequestError(f"{param}: expected a data URL or base64 text", param=param)
    scheme = ref.split(":", 1)[0].lower() if ":" in ref[:16] else ""
    if scheme == "data":
        return _data_url(ref, param, max_bytes)
    if scheme in ("http", "https"):
        if not cfg.allow_url_fetch:
            raise InvalidRequestError(f"{param}: this server does not fetch URLs (app.media.allow_url_fetch is "
                                      "off); send the media inline as a base64 data: URL", param=param)
        return _fetch(ref, param, cfg, max_bytes)
    if scheme == "file":
        return _local(ref, param, cfg, max_bytes)
    if scheme:
        raise InvalidRequestError(f"{param}: URL scheme {scheme!r} is not accepted (data: URLs only)", param=param)
    return _b64(ref.strip(), param, max_bytes), ""
