"""Qwen2.5-Omni token2wav's ODE solver as a per-request stepper the DiT engine drives.

transformers' ``RungeKutta4ODESolver.integrate`` walks a sway-sampled time grid
``t = linspace(0, 1, num_steps); t += sway * (cos(pi/2 t) - 1 + t)`` with one classic 3/8-rule
RK4 step per interval: four evaluations of the flow ``f(t, y)`` (at ``t0``, ``t0 + h/3``,
``t0 + 2h/3``, ``t1``). Here each evaluation is one engine step (one batched transformer
forward), so requests at different points of their integration share forwards: ``timesteps``
lists the evaluation times (4 per interval) and ``step(k, t, y)`` takes the flow at the current
evaluation point and returns the next point to evaluate (after the fourth, the new solution).

The arithmetic repeats the reference's expressions in the same order and dtype, so the result
equals ``RungeKutta4ODESolver`` up to the transformer's own batch-dependent rounding.
"""

from __future__ import annotations

import torch


def sway_grid(num_steps: int, sway_coefficient: float | None) -> torch.Tensor:
    """The reference's time points (float32, CPU): ``num_steps`` of them, ``num_steps - 1`` intervals."""
    t = torch.linspace(0, 1, num_steps, dtype=torch.float32)
    if sway_coefficient is not None:
        t += sway_coefficient * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


class RK4FlowScheduler:
    """One request's RK4 integration state (the diffusers scheduler interface the engine calls)."""

    ONE_THIRD, TWO_THIRDS = 1 / 3, 2 / 3

    def __init__(self, num_steps: int, sway_coefficient: float | None = -1.0):
        self.grid = sway_grid(num_steps, sway_coefficient)
        evals = []
        for t0, t1 in zip(self.grid[:-1], self.grid[1:]):
            h = t1 - t0
            evals += [t0, t0 + h * self.ONE_THIRD, t0 + h * self.TWO_THIRDS, t1]
        self.timesteps = torch.stack(evals) if evals else torch.zeros(0)
        self._interval = 0
        self._k: list[torch.Tensor] = []
        self._y0: torch.Tensor | None = None

    def step(self, k: torch.Tensor, t, sample: torch.Tensor, return_dict: bool = False, **_):
        """``k`` = f(t, sample) at the current evaluation point -> (the next point to evaluate,)."""
        h = self.grid[self._interval + 1] - self.grid[self._interval]
        stage = len(self._k)
        if stage == 0:
            self._y0 = sample
        y0 = self._y0
        self._k.append(k)
        if stage == 0:
            nxt = y0 + h * k * self.ONE_THIRD
        elif stage == 1:
            k1 = self._k[0]
            nxt = y0 + h * (k - k1 * self.ONE_THIRD)
        elif stage == 2:
            k1, k2 = self._k[0], self._k[1]
            nxt = y0 + h * (k1 - k2 + k)
        else:
            k1, k2, k3 = self._k[:3]
            nxt = y0 + (k1 + 3 * (k2 + k3) + k) * h / 8
            self._k, self._y0 = [], None
            self._interval += 1
        return (nxt,)
