"""One lock per process between CUDA graph captures and the engine steps that draw CUDA random numbers.

While a thread captures a CUDA graph, torch puts the default CUDA generator in capture mode for the whole
process: a sampling step of an AR engine in another thread (``exponential_`` on the default generator, or
the replay of a decode graph that holds it) then fails with "Offset increment outside graph capture
encountered unexpectedly". That happens where stages share a process (``OmniLLM`` runs the thinker and
talker on AR engines and token2wav on the DiT engine, whose graphs are captured per shape the first time
it is seen). So a capture holds the lock alone, and each AR engine step holds it shared: steps of several
engines run at once (the thinker's and the talker's, each on its own thread), a capture waits until none
is in flight and new steps wait while a capture waits. A process-wide lock for a process-wide resource
(the default generator), not configuration.

    with capture_lock():                 # alone
        with torch.cuda.graph(g, ...): ...
    with step_lock():                    # shared with other steps
        engine.step_seqs()

Re-entrant on one thread: a step may capture (an AR engine capturing a graph inside its own step steps
aside while it waits, so two engines that capture inside their steps at once do not wait on each other),
and a capture may nest captures and steps.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class StepCaptureLock:
    def __init__(self):
        self._cond = threading.Condition()
        self._steps: dict[int, int] = {}      # thread -> shared holds (its steps in flight)
        self._owner: int | None = None        # the capturing thread
        self._depth = 0                       # its nested captures
        self._waiting = 0                     # captures waiting: new steps wait behind them

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner != me and not self._steps.get(me):
                while self._owner is not None or self._waiting:
                    self._cond.wait()
            self._steps[me] = self._steps.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._steps.pop(me) - 1
                if left:
                    self._steps[me] = left
                self._cond.notify_all()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                aside = 0
            else:
                aside = self._steps.pop(me, 0)        # this thread's own steps step aside while it waits
                self._waiting += 1
                self._cond.notify_all()
                try:
                    while self._owner is not None or self._steps:
                        self._cond.wait()
                except BaseException:
                    if aside:
                        self._steps[me] = aside
                    raise
                finally:
                    self._waiting -= 1
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                if aside:
                    self._steps[me] = aside           # back inside its steps
                self._cond.notify_all()


_LOCK = StepCaptureLock()


def capture_lock():
    """A CUDA graph capture: alone in the process (``with capture_lock(): ...``)."""
    return _LOCK.capture()


def exclusive_lock():
    """Work that runs with no engine step beside it (a capture, a first speech window's ODE: Token2WavODE)."""
    return _LOCK.capture()


def step_lock():
    """An engine step that samples on the default CUDA generator: beside other steps, never during a capture."""
    return _LOCK.step()
