"""Pins of the AR stage (hidden states held for the DiT stage): they expire and respect the byte budget."""

from __future__ import annotations

from deployments.stages.pins import Pins


def test_pins_expire_and_respect_the_budget():
    now = [0.0]
    p = Pins(ttl_s=10, max_bytes=100, clock=lambda: now[0])
    p.hold("a", 40)
    p.hold("b", 40)
    assert len(p) == 2 and p.bytes == 80
    p.hold("c", 40)                       # over budget: the oldest goes
    assert len(p) == 2 and p.bytes == 80
    now[0] = 11
    p.prune()
    assert len(p) == 0 and p.bytes == 0
