"""Audio out (omni_ray/media/audio_out.py): every format decodes back (soundfile; AAC with PyAV) to
the samples, within pcm16 quantisation for the lossless ones; streamed bytes form one valid file."""

import io

import numpy as np
import pytest
import soundfile as sf

from omni_ray.media.audio_out import FORMATS, STREAM_FORMATS, AudioStreamEncoder, encode_audio, output_rate

RATE = 24000
Q = 1.5 / 32768                     # pcm16 quantisation: the 32767 scale and the rounding


def tone(seconds: float = 0.25, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 1234 * t + 0.5)
    x[:10] = [1.0, -1.0, 0.999, -0.999, 0.0, 1e-5, -1e-5, 0.5, -0.5, 0.25]    # the edges of the range
    return x.astype(np.float32)


def decode(data: bytes, fmt: str, rate: int = RATE) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return sf.read(io.BytesIO(data), dtype="float32", format="RAW", subtype="PCM_16", samplerate=rate,
                       channels=1, endian="LITTLE")
    if fmt == "aac":
        import av

        with av.open(io.BytesIO(data), format="adts") as c:
            frames = [f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]
            return np.concatenate(frames).astype(np.float32), c.streams.audio[0].rate
    return sf.read(io.BytesIO(data), dtype="float32")


def aligned_error(x: np.ndarray, y: np.ndarray) -> float:
    """The relative error of a lossy codec's output ``y`` against ``x``, at the codec delay (it adds
    leading samples) that fits best."""
    body = x[1000:-1000]
    best = min(range(0, 4096), key=lambda d: float(np.sum((y[1000 + d:1000 + d + body.size] - body) ** 2))
               if 1000 + d + body.size <= y.size else np.inf)
    seg = y[1000 + best:1000 + best + body.size]
    return float(np.sqrt(np.mean((seg - body) ** 2)) / np.sqrt(np.mean(body ** 2)))


@pytest.mark.parametrize("fmt", ["pcm", "wav", "flac"])
def test_lossless_formats_give_the_samples_back(fmt):
    x = tone()
    y, rate = decode(encode_audio(x, RATE, fmt), fmt)
    assert rate == RATE and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=Q, rtol=0)


def test_pcm_is_raw_little_endian_int16():
    data = encode_audio(np.array([0.0, 1.0, -1.0, 0.5, 2.0, np.nan], np.float32), RATE, "pcm16")
    assert np.frombuffer(data, "<i2").tolist() == [0, 32767, -32767, 16384, 32767, 0]   # clipped; NaN -> 0


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac"])
def test_lossy_formats_decode_to_the_tone(fmt):
    x = tone(0.5)
    y, rate = decode(encode_audio(x, RATE, fmt), fmt)
    assert rate == RATE
    assert y.size >= x.size
    assert aligned_error(x, y) < 0.25, fmt


def test_a_rate_opus_lacks_is_resampled():
    x = tone(0.5, 22050)
    assert output_rate("opus", 22050) == 48000 and output_rate("wav", 22050) == 22050
    y, rate = decode(encode_audio(x, 22050, "opus"), "opus")
    assert rate == 48000 and abs(y.size - 24000) < 2000        # 0.5 s at 48 kHz


@pytest.mark.parametrize("fmt", STREAM_FORMATS)
def test_streamed_chunks_make_one_file(fmt):
    x = tone(0.5)
    enc = AudioStreamEncoder(fmt, RATE)
    parts = [enc.write(c) for c in np.array_split(x, 7)]
    tail = enc.close()
    assert enc.close() == b""
    if fmt in ("pcm", "wav", "mp3", "aac"):
        assert sum(len(p) > 0 for p in parts) >= 4, "bytes leave before the end"
    y, rate = decode(b"".join(parts) + tail, fmt)
    assert rate == RATE
    if fmt in ("pcm", "wav"):
        assert y.shape == x.shape
        np.testing.assert_allclose(y, x, atol=1.5 * Q, rtol=0)
    else:
        assert aligned_error(x, y) < 0.25, fmt


def test_streamed_opus_leaves_before_the_end():
    enc = AudioStreamEncoder("opus", RATE)
    sizes = [len(enc.write(c)) for c in np.array_split(tone(1.0), 10)]
    assert sum(s > 0 for s in sizes) >= 5


def test_streamed_pcm_equals_the_whole():
    x = tone()
    enc = AudioStreamEncoder("pcm16", RATE)
    assert b"".join(enc.write(c) for c in np.array_split(x, 5)) + enc.close() == encode_audio(x, RATE, "pcm")


@pytest.mark.parametrize("bad", ["ogg", "m4a", "PCM", ""])
def test_unknown_formats_are_refused(bad):
    with pytest.raises(ValueError, match="not supported"):
        encode_audio(tone(), RATE, bad)


def test_flac_is_not_streamed():
    assert "flac" in FORMATS and "flac" not in STREAM_FORMATS
    with pytest.raises(ValueError, match="cannot be streamed"):
        AudioStreamEncoder("flac", RATE)


def test_stereo_is_refused():
    with pytest.raises(ValueError, match="1-D"):
        encode_audio(np.zeros((2, 10), np.float32), RATE, "wav")
