"""The start-up heap, frozen: once a process has built its engines (torch, transformers, the models'
modules: hundreds of thousands of tracked objects), a full garbage collection walks all of them, a pause of
tens of milliseconds on whatever thread triggers it, in the middle of a decode step or a streamed audio
window. ``gc.freeze()`` moves them to a permanent generation that collections skip, as vLLM's engine core
does after loading its model; objects made later are collected as usual.

    freeze_startup_heap()       # after the engines of this process are built
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    gc.collect()
    gc.freeze()
