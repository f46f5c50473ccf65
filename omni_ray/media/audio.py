"""Decode a user's audio with soundfile (WAV, FLAC, OGG, MP3 via libsndfile) into float32 mono at
the model's sampling rate (resampled with soxr), refusing clips over the duration limit before
decoding them."""

from __future__ import annotations

import io

import numpy as np

from omni_ray.config import MediaConfig
from omni_ray.errors import InvalidRequestError
from omni_ray.media.sources import read_source

FORMATS = {"wav": "WAV", "mp3": "MP3", "flac": "FLAC", "ogg": "OGG"}


def _check_duration(frames: int, rate: int, param: str, cfg: MediaConfig) -> None:
    if rate <= 0 or frames <= 0:
        raise InvalidRequestError(f"{param}: the audio is empty", param=param)
    seconds = frames / rate
    if seconds > cfg.max_audio_seconds:
        raise InvalidRequestError(f"{param}: the audio is {seconds:.1f} s; the limit is app.media.max_audio_seconds"
                                  f" = {cfg.max_audio_seconds:g}", param=param)


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    if rate == target_rate:
        return wave
    import soxr

    return soxr.resample(wave, rate, target_rate).astype(np.float32, copy=False)


def decode_audio(data: bytes, fmt: str | None, param: str, cfg: MediaConfig, target_rate: int) -> np.ndarray:
    """float32 mono [samples] at ``target_rate`` from encoded bytes (``fmt``: wav, mp3, ... or None: sniff)."""
    import soundfile as sf

    if fmt is not None and fmt.lower() not in FORMATS:
        raise InvalidRequestError(f"{param}: audio format {fmt!r} is not supported ({', '.join(FORMATS)})",
                                  param=param)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            _check_duration(f.frames, f.samplerate, param, cfg)
            wave, rate = f.read(dtype="float32", always_2d=True), f.samplerate
    except InvalidRequestError:
        raise
    except Exception as e:                               # soundfile raises LibsndfileError / RuntimeError
        raise InvalidRequestError(f"{param}: not decodable audio ({', '.join(FORMATS)}): {type(e).__name__}",
                                  param=param) from None
    return resample(wave.mean(axis=1), rate, target_rate)


def load_audio(ref, param: str, cfg: MediaConfig, target_rate: int, fmt: str | None = None) -> np.ndarray:
    """Audio from base64 / a data URL / bytes (``input_audio.data``), or an offline caller's
    ``(array, sample_rate)`` pair, as float32 mono at ``target_rate``."""
    if isinstance(ref, tuple) and len(ref) == 2 and not isinstance(ref[0], (str, bytes)):
        wave, rate = np.asarray(ref[0], dtype=np.float32), int(ref[1])
        if wave.ndim == 2:                               # [channels, samples] or [samples, channels]
            wave = wave.mean(axis=0 if wave.shape[0] < wave.shape[1] else 1)
        if wave.ndim != 1 or not np.isfinite(wave).all():
            raise InvalidRequestError(f"{param}: audio must be a finite 1-D (or 2-D channels) array", param=param)
        _check_duration(wave.shape[0], rate, param, cfg)
        return resample(wave, rate, target_rate)
    data, _ = read_source(ref, param, cfg, cfg.max_audio_bytes)
    return decode_audio(data, fmt, param, cfg, target_rate)
