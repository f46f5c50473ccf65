"""CUDA green contexts from one split of a GPU's SMs, through the CUDA driver API (ctypes, no extra package).

``torch.cuda.green_contexts.GreenContext.create(num_sms=N)`` takes the GPU's first N SMs every time it is called,
so two engines of one process that each ask for a share get overlapping SMs. ``SmSplit(index, n)`` splits the SMs
once into two disjoint groups, the first ``n`` (rounded up to the driver's partition alignment) and the rest, makes a
green context of each, and streams in either (``stream(side)``): the speech pipeline's thinker and talker decode on
the first 96 SMs of an H100 while token2wav's window kernels have the other 36 to themselves.

    split = SmSplit(0, 96)
    split.counts                 # {"first": 96, "last": 36}
    s = split.stream("last")     # a torch.cuda.ExternalStream: kernels launched (or graphs captured) on it run
                                 # on those SMs only
"""

from __future__ import annotations

import ctypes
import threading

import torch

_RESOURCE_SM = 1            # CU_DEV_RESOURCE_TYPE_SM
_GREEN_DEFAULT_STREAM = 1   # CU_GREEN_CTX_DEFAULT_STREAM (required by cuGreenCtxCreate)
_STREAM_NON_BLOCKING = 1    # CU_STREAM_NON_BLOCKING: no implicit sync with the legacy default stream, like torch's


class _SmResource(ctypes.Structure):
    _fields_ = [("sm_count", ctypes.c_uint), ("min_partition_size", ctypes.c_uint),
                ("coscheduled_alignment", ctypes.c_uint), ("flags", ctypes.c_uint)]


class _DevResource(ctypes.Structure):
    """``CUdevResource`` (cuda.h, 144 bytes from CUDA 12.4 to 13.x): the type, 92 bytes of padding, a union whose
    SM member is read here (40 bytes in 13.x, 48 in 12.x), then 13.x's ``nextResource`` pointer."""
    _fields_ = [("type", ctypes.c_int), ("_padding", ctypes.c_ubyte * 92), ("sm", _SmResource),
                ("_union_rest", ctypes.c_ubyte * 24), ("next_resource", ctypes.c_void_p)]


assert ctypes.sizeof(_DevResource) == 144


class GreenContextError(RuntimeError):
    """The driver refused a green context (an old driver, an SM count it cannot split)."""


def _driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise GreenContextError(f"the CUDA driver library could not be loaded: {err}") from err


def _check(lib: ctypes.CDLL, result: int, call: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(result, ctypes.byref(name))
        raise GreenContextError(f"{call} failed: {(name.value or b'?').decode()} ({result})")


class SmSplit:
    """A device's SMs split once into its first ``sms`` (rounded up to the driver's alignment) and the rest, with a
    green context of each, kept for the process's life (as are the streams made in them)."""

    def __init__(self, index: int, sms: int):
        torch.cuda.init()                      # the driver and the device's primary context, as torch uses them
        lib = self._lib = _driver()
        dev = ctypes.c_int()
        _check(lib, lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
        whole, first, rest = _DevResource(), _DevResource(), _DevResource()
        _check(lib, lib.cuDeviceGetDevResource(dev, ctypes.byref(whole), _RESOURCE_SM), "cuDeviceGetDevResource")
        if not 0 < sms < whole.sm.sm_count:
            raise GreenContextError(f"{sms} SMs: the GPU has {whole.sm.sm_count}")
        groups = ctypes.c_uint(1)
        _check(lib, lib.cuDevSmResourceSplitByCount(ctypes.byref(first), ctypes.byref(groups), ctypes.byref(whole),
                                                    ctypes.byref(rest), 0, sms), f"splitting {sms} SMs")
        self.total = whole.sm.sm_count
        self.counts = {"first": first.sm.sm_count, "last": rest.sm.sm_count}
        if groups.value != 1 or self.counts["last"] == 0:
            raise GreenContextError(f"{sms} of {self.total} SMs leave no second group (driver: {self.counts})")
        self._contexts = {side: self._context(dev, res) for side, res in (("first", first), ("last", rest))}

    def _context(self, dev: ctypes.c_int, resource: _DevResource) -> ctypes.c_void_p:
        lib, desc, ctx = self._lib, ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib, lib.cuDevResourceGenerateDesc(ctypes.byref(desc), ctypes.byref(resource), 1),
               "cuDevResourceGenerateDesc")
        _check(lib, lib.cuGreenCtxCreate(ctypes.byref(ctx), desc, dev, _GREEN_DEFAULT_STREAM), "cuGreenCtxCreate")
        return ctx

    def stream(self, side: str, device: torch.device, high_priority: bool = False) -> torch.cuda.ExternalStream:
        """A new stream of the ``side`` ("first" / "last") group's green context; ``high_priority``: the device's
        highest stream priority (the driver clamps the value to its range)."""
        handle = ctypes.c_void_p()
        _check(self._lib, self._lib.cuGreenCtxStreamCreate(ctypes.byref(handle), self._contexts[side],
                                                           _STREAM_NON_BLOCKING, -100 if high_priority else 0),
               "cuGreenCtxStreamCreate")
        return torch.cuda.ExternalStream(handle.value, device=device)     # the stream lives as long as the process


_SPLITS: dict[tuple[int, int], SmSplit] = {}   # per (device, first group's size): engines of one process share a
_LOCK = threading.Lock()                       # split, so their groups never overlap; kept for the process's life


def split_for(index: int, first_sms: int) -> SmSplit:
    """The process's split of device ``index`` with a first group of ``first_sms`` SMs (made on first use)."""
    with _LOCK:
        key = (index, first_sms)
        if key not in _SPLITS:
            _SPLITS[key] = SmSplit(index, first_sms)
        return _SPLITS[key]
