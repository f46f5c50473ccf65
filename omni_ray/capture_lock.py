"""One lock per process between CUDA graph captures and the engine steps that draw CUDA random numbers.

While a thread captures a CUDA graph, torch puts the default CUDA generator in capture mode for the whole
process: a sampling step of an AR engine in another thread (``exponential_`` on the default generator, or
the replay of a decode graph that holds it) then fails with "Offset increment outside graph capture
encountered unexpectedly". That happens where stages share a process (``OmniLLM`` runs the thinker and
talker on AR engines and token2wav on the DiT engine, whose graphs are captured per shape the first time
it is seen). So captures take this lock, and so does each AR engine step; captures are rare (once per
shape) and short, an uncontended lock costs nothing a step can see. A process-wide lock for a
process-wide resource (the default generator), not configuration.

    with capture_lock():
        with torch.cuda.graph(g, ...): ...
"""

from __future__ import annotations

import threading

_LOCK = threading.RLock()       # re-entrant: an AR engine may capture a graph inside its own step


def capture_lock() -> threading.RLock:
    return _LOCK
