"""Audio out: float32 samples in [-1, 1] -> the bytes of an audio file, whole or streamed.

    data = encode_audio(samples, 24000, "mp3")            # a whole file
    enc = AudioStreamEncoder("pcm", 24000)                # a stream: bytes as the chunks come
    parts = [enc.write(chunk) for chunk in chunks] + [enc.close()]

Formats (OpenAI's names; ``pcm16`` is the chat API's name of ``pcm``):

    pcm    raw 16-bit little-endian mono samples, no header          whole and streamed
    wav    16-bit PCM WAV                                             whole (soundfile); streamed (PyAV)
    flac   16-bit FLAC                                                whole (soundfile)
    mp3    MPEG layer III (LAME)                                      whole (soundfile); streamed (PyAV)
    opus   Opus in Ogg                                                whole (soundfile); streamed (PyAV)
    aac    AAC-LC in ADTS frames (FFmpeg's native encoder)            whole and streamed (PyAV)

Containers and codecs are libsndfile's (soundfile) and FFmpeg's (PyAV), never written here. A
streamed WAV is FFmpeg's streaming form: its RIFF and data sizes are 0xFFFFFFFF (unknown length),
which decoders read to the end of the data. A streamed FLAC would have no length in its STREAMINFO
header and some decoders (libsndfile) refuse that, so FLAC is not streamed. Opus and MP3 take only
some sample rates; other rates are resampled (soxr) to 48 kHz first.
"""

from __future__ import annotations

import io

import numpy as np

FORMATS = ("wav", "pcm", "flac", "mp3", "opus", "aac")
STREAM_FORMATS = ("pcm", "wav", "mp3", "opus", "aac")
ALIASES = {"pcm16": "pcm"}
CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
                 "opus": "audio/ogg", "aac": "audio/aac"}
RATES = {"opus": (8000, 12000, 16000, 24000, 48000),
         "mp3": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)}
_SOUNDFILE = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
              "opus": ("OGG", "OPUS")}
_PYAV = {"wav": ("wav", "pcm_s16le", {}), "mp3": ("mp3", "libmp3lame", {}),
         "opus": ("ogg", "libopus", {"page_duration": "20000"}),         # an Ogg page per 20 ms: streams
         "aac": ("adts", "aac", {})}


def canonical(fmt: str) -> str:
    """The format's name here (``pcm16`` -> ``pcm``); ValueError for one not in FORMATS."""
    name = ALIASES.get(fmt, fmt)
    if name not in FORMATS:
        raise ValueError(f"audio format {fmt!r} is not supported ({', '.join(FORMATS)})")
    return name


def _mono(samples) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"audio samples must be 1-D (mono), got shape {list(x.shape)}")
    return np.clip(np.nan_to_num(x), -1.0, 1.0)


def to_pcm16(samples) -> bytes:
    """Raw 16-bit little-endian PCM (``pcm``): each sample times 32767, rounded, as libsndfile does."""
    return np.rint(_mono(samples) * 32767.0).astype("<i2").tobytes()


def output_rate(fmt: str, sample_rate: int) -> int:
    """The rate a ``fmt`` file of ``sample_rate`` audio is written at (48 kHz where the codec has no such rate)."""
    allowed = RATES.get(canonical(fmt))
    return sample_rate if allowed is None or sample_rate in allowed else 48000


def _resampled(x: np.ndarray, rate: int, fmt: str) -> tuple[np.ndarray, int]:
    out = output_rate(fmt, rate)
    if out == rate:
        return x, rate
    from omni_ray.media.audio import resample

    return np.clip(resample(x, rate, out), -1.0, 1.0), out


def encode_audio(samples, sample_rate: int, fmt: str) -> bytes:
    """The whole file of ``samples`` (float32 mono in [-1, 1]) at ``sample_rate`` in ``fmt``."""
    fmt = canonical(fmt)
    x = _mono(samples)
    if fmt == "pcm":
        return to_pcm16(x)
    if fmt in _SOUNDFILE:
        import soundfile as sf

        x, rate = _resampled(x, sample_rate, fmt)
        container, subtype = _SOUNDFILE[fmt]
        buf = io.BytesIO()
        sf.write(buf, x, rate, format=container, subtype=subtype)
        return buf.getvalue()
    enc = AudioStreamEncoder(fmt, sample_rate)
    return enc.write(x) + enc.close()


class _Sink(io.RawIOBase):
    """A write-only, non-seekable file: the muxer writes a streamable form; ``take`` drains it."""

    def __init__(self):
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, b) -> int:
        self.buf += b
        return len(b)

    def take(self) -> bytes:
        out, self.buf = bytes(self.buf), bytearray()
        return out


class AudioStreamEncoder:
    """Encode chunks as they come: ``write(chunk)`` returns the bytes ready so far (maybe none: a
    codec holds a frame's worth), ``close()`` the rest. The concatenation is one valid file (or
    raw ``pcm``). Formats: STREAM_FORMATS."""

    def __init__(self, fmt: str, sample_rate: int):
        self.fmt = canonical(fmt)
        if self.fmt not in STREAM_FORMATS:
            raise ValueError(f"audio format {fmt!r} cannot be streamed ({', '.join(STREAM_FORMATS)})")
        self.rate, self.closed = int(sample_rate), False
        self._container = self._stream = self._resampler = None
        if self.fmt != "pcm":
            import av

            container, codec, options = _PYAV[self.fmt]
            self._sink = _Sink()
            self._out_rate = output_rate(self.fmt, self.rate)
            self._container = av.open(self._sink, "w", format=container, options=options)
            self._stream = self._container.add_stream(codec, rate=self._out_rate)
            self._stream.layout = "mono"
            if self._out_rate != self.rate:
                import soxr

                self._resampler = soxr.ResampleStream(self.rate, self._out_rate, 1, dtype="float32")

    def write(self, samples) -> bytes:
        if self.closed:
            raise ValueError("the encoder is closed")
        x = _mono(samples)
        if self.fmt == "pcm":
            return to_pcm16(x)
        if self._resampler is not None:
            x = np.clip(self._resampler.resample_chunk(x), -1.0, 1.0)
        self._encode(x)
        return self._sink.take()

    def close(self) -> bytes:
        """The bytes still held (the codec's last frames, the container's trailer); idempotent."""
        if self.closed or self.fmt == "pcm":
            self.closed = True
            return b""
        self.closed = True
        if self._resampler is not None:
            self._encode(np.clip(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True), -1.0, 1.0))
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()

    def _encode(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        import av

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, :]), format="flt", layout="mono")
        frame.sample_rate = self._out_rate
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
