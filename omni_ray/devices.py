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


def to_device(x, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host value (list, numpy array, CPU tensor) as a tensor on ``device``, without the host waiting for the
    device: on CUDA through pinned memory and a non-blocking copy. A copy from pageable memory first waits for
    all work queued on the stream, and the engines of one process (thinker, talker, token2wav) queue on the same
    one: a talker step's few small copies each waited for the thinker's queued decode run or a token2wav ODE
    (~260 ms of a talker prefill on an H100, by py-spy). Elsewhere a plain ``.to(device)``."""
    if device.type != "cuda" or (isinstance(x, torch.Tensor) and x.device.type == "cuda"):
        return torch.as_tensor(x, dtype=dtype).to(device)
    src = x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=dtype)     # numpy: a view (its memory can't
    pinned = torch.empty(src.shape, dtype=dtype or src.dtype, pin_memory=True)      # be pinned in place)
    return pinned.copy_(src).to(device, non_blocking=True)      # one host copy (and cast), into pinned memory


def green_stream(device: torch.device, sms: int, side: str = "first", high_priority: bool = False) -> torch.cuda.Stream:
    """A stream whose kernels (and the graphs captured on it) run on ``sms`` of the GPU's SMs only, leaving the rest
    to other streams: ``side`` "first": the GPU's first ``sms`` SMs; "last": its last ``sms``. The process splits
    the SMs once per boundary (``omni_ray.green_contexts``), so engines asking for 96 first and 36 last SMs of an
    H100's 132 get disjoint groups; the driver rounds a group to its partition alignment."""
    from omni_ray.green_contexts import split_for

    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).multi_processor_count
    if not 0 < sms < total:
        raise ValueError(f"cuda_stream_sms={sms}: the GPU has {total} SMs")
    if side not in ("first", "last"):
        raise ValueError(f"side must be first or last, not {side!r}")
    split = split_for(index, sms if side == "first" else total - sms)
    return split.stream(side, torch.device("cuda", index), high_priority)


def own_stream(device: torch.device, high_priority: bool = False, stream: torch.cuda.Stream | None = None):
    """The calling thread's device work from now on goes to a new CUDA stream of its own (ordered after what is
    queued on the thread's current stream); returns it, or None off CUDA. An engine's thread calls it when the
    config asks for ``cuda_stream``; ``high_priority`` (``cuda_stream_priority: high``): the device's highest stream
    priority, whose pending kernels are scheduled before those of normal streams; ``stream``: that one, made
    before (an AR runner's green stream, ``cuda_stream_sms``, which its graphs were captured on)."""
    if device.type != "cuda":
        return None
    s = stream if stream is not None else torch.cuda.Stream(device, priority=-100 if high_priority else 0)
    s.wait_stream(torch.cuda.current_stream(device))
    torch.cuda.set_stream(s)                   # the current stream is per thread
    return s
