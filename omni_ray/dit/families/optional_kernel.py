"""A hand-written kernel that a fused block uses where it applies, and gives up on for good if it cannot run."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class OptionalKernel:
    """``OptionalKernel(what, applies="applies")``; ``module`` (set when the block's helpers are fused) has the
    ``applies(*conds)`` function named and the kernel's entry points. ``call(conds, name, *args)`` returns the
    kernel's result, or None: not fused, a call the kernel does not take, or a kernel that cannot compile or
    launch on this device. That last is found on its first call (in the engine's warm-up, before any CUDA graph
    capture), and the block's compiled helpers run from then on."""

    def __init__(self, what: str, applies: str = "applies"):
        self.what, self.applies = what, applies
        self.module = None
        self.ran = False

    def call(self, conds: tuple, name: str, *args):
        module = self.module
        if module is None or not getattr(module, self.applies)(*conds):
            return None
        if self.ran:
            return getattr(module, name)(*args)
        try:
            out = getattr(module, name)(*args)
        except Exception as err:          # noqa: BLE001 - a compiler or driver error: keep serving without it
            log.warning("%s kernel unavailable (%r): using the compiled helpers", self.what, err)
            self.module = None
            return None
        self.ran = True
        return out
