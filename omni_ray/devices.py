"""Device and dtype resolution shared by the engines: the config's ``device`` / ``model.dtype`` strings
(``auto`` included) to torch objects."""

from __future__ import annotations

import torch

from omni_ray.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else CPU. Asking for CUDA without it is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def engine_stream(device: torch.device | None) -> "torch.cuda.Stream | None":
    """A CUDA stream of an engine's own (None off CUDA: ``torch.cuda.stream(None)`` is a no-op).

    Several engines may share one process and one GPU (``OmniLLM``'s speech graph: the thinker's and the
    talker's engine threads and token2wav's worker). On the default stream their work would run in one
    queue: a 36-forward token2wav ODE would hold the talker's next decode step, and every host read (a
    sampled token, a mel to the host) would wait for the other engines' queued work too. On a stream each,
    the GPU interleaves them and a host read waits for its own engine only. Engines put all their device
    work on their stream (steps, request set-up); ``catch_up`` orders the stream after what other threads
    queued on the default stream (model loading, tensors handed in by a caller)."""
    if device is None or device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    catch_up(stream)
    return stream


def catch_up(stream: "torch.cuda.Stream | None") -> None:
    """Order ``stream`` after the work queued so far on its device's default stream."""
    if stream is not None:
        stream.wait_stream(torch.cuda.default_stream(stream.device))
