"""User media is checked before it is decoded: byte budgets, pixel and duration limits, no network
fetch unless configured, no schemes but data:, formats by maintained decoders."""

import base64
import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omni_ray.config import MediaConfig
from omni_ray.errors import InvalidRequestError
from omni_ray.media import load_audio, load_image, read_source


def png(w=8, h=6, color=(10, 200, 30)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (w, h), color).save(b, format="PNG")
    return b.getvalue()


def data_url(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def wav(seconds=0.5, rate=22050, fmt="WAV", channels=1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    if channels == 2:
        x = np.stack([x, x], axis=1)
    b = io.BytesIO()
    sf.write(b, x, rate, format=fmt)
    return b.getvalue()


def test_image_from_data_url_base64_and_pil():
    cfg = MediaConfig()
    for ref in (data_url(png()), base64.b64encode(png()).decode(), png(), Image.new("L", (8, 6))):
        img = load_image(ref, "messages.0.content.1.image_url", cfg)
        assert img.mode == "RGB" and img.size == (8, 6)
    assert load_image(data_url(png()), "x", cfg).getpixel((0, 0)) == (10, 200, 30)


@pytest.mark.parametrize("ref, words", [
    ("http://example.com/a.png", "does not fetch URLs"),
    ("file:///etc/passwd", "reads no local files"),
    ("ftp://host/a.png", "scheme .ftp."),
    ("data:image/png,abc", "only base64"),
    ("data:image/png;base64,@@@", "not valid base64"),
    (data_url(b"not an image"), "not a decodable image"),
    (data_url(png(), mime="text/plain"), "expected an image"),
])
def test_image_refusals_name_the_field(ref, words):
    with pytest.raises(InvalidRequestError, match=words) as e:
        load_image(ref, "messages.0.content.1.image_url", MediaConfig())
    assert e.value.param == "messages.0.content.1.image_url"


def test_image_limits_checked_before_decoding():
    cfg = MediaConfig(max_image_pixels=100, max_image_bytes=2048)
    with pytest.raises(InvalidRequestError, match="max_image_pixels = 100"):
        load_image(png(20, 20), "img", cfg)
    big = png(8, 6) + b"\0" * 4096
    with pytest.raises(InvalidRequestError, match="2048 byte limit"):
        load_image(data_url(big), "img", cfg)
    # a PNG header claiming 100k x 100k pixels is refused from the header alone
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    with pytest.raises(InvalidRequestError, match="pixels"):
        load_image(bomb.getvalue(), "img", MediaConfig(max_image_bytes=1 << 20))


def test_url_fetch_only_when_allowed_and_only_listed_hosts():
    cfg = MediaConfig(allow_url_fetch=True, allowed_domains=["example.org"])
    with pytest.raises(InvalidRequestError, match="not in app.media.allowed_domains"):
        read_source("https://evil.example.com/x.png", "img", cfg, 1000)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_audio_decoded_mono_at_model_rate(fmt):
    out = load_audio(base64.b64encode(wav(0.5, 22050, fmt, channels=2)).decode(), "input_audio", MediaConfig(),
                     16000, fmt=fmt.lower())
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.shape[0] - 8000) <= 1200          # MP3 pads frames; the others are exact within resampling
    # a 440 Hz tone survives the resampling: the spectrum peaks there
    spec = np.abs(np.fft.rfft(out[:4096]))
    assert abs(np.argmax(spec) * 16000 / 4096 - 440) < 10


def test_audio_offline_array_and_limits():
    x = np.zeros(16000 * 2, dtype=np.float32)
    assert load_audio((x, 16000), "audio", MediaConfig(), 16000).shape == (32000,)
    assert load_audio((x, 8000), "audio", MediaConfig(), 16000).shape == (64000,)
    with pytest.raises(InvalidRequestError, match="max_audio_seconds = 1"):
        load_audio((x, 16000), "audio", MediaConfig(max_audio_seconds=1), 16000)
    with pytest.raises(InvalidRequestError, match="max_audio_seconds"):
        load_audio(base64.b64encode(wav(2.0)).decode(), "audio", MediaConfig(max_audio_seconds=1), 16000)
    with pytest.raises(InvalidRequestError, match="not decodable audio"):
        load_audio(base64.b64encode(b"RIFF0000garbage").decode(), "audio", MediaConfig(), 16000)
    with pytest.raises(InvalidRequestError, match="format 'aac'"):
        load_audio(base64.b64encode(wav()).decode(), "audio", MediaConfig(), 16000, fmt="aac")
    with pytest.raises(InvalidRequestError, match="finite"):
        load_audio((np.array([np.nan, 0.0]), 16000), "audio", MediaConfig(), 16000)


def test_local_files_only_under_the_configured_directory(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png())
    (tmp_path / "ok" / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(InvalidRequestError, match="reads no local files"):
        load_image(f"file://{tmp_path}/ok/a.png", "img", MediaConfig())
    cfg = MediaConfig(allowed_local_media_path=str(tmp_path / "ok"))
    assert load_image(f"file://{tmp_path}/ok/a.png", "img", cfg).size == (8, 6)
    for bad in (f"file://{tmp_path}/secret.png", f"file://{tmp_path}/ok/../secret.png", f"file://{tmp_path}/ok/link.png"):
        with pytest.raises(InvalidRequestError, match="not a file under"):
            load_image(bad, "img", cfg)
