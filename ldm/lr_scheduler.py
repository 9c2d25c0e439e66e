"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR`` (CompVis names and parameters).

Each scheduler is a callable ``f(step) -> factor``; ``LatentDiffusion.configure_optimizers`` wraps
``scheduler.schedule`` in a step-wise ``LambdaLR``, so the learning rate is ``base_lr * f(step)``.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

logger = logging.getLogger(__name__)


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from ``lr_start`` to ``lr_max``, then cosine decay to ``lr_min`` at ``max_decay_steps``.

    Args:
        warm_up_steps: steps of linear warm-up.
        lr_min, lr_max, lr_start: the multipliers at the end of decay, after warm-up and at step 0.
        max_decay_steps: the step at which the cosine reaches ``lr_min`` (held afterwards).
        verbosity_interval: log the multiplier every this many steps (0: never).
    """

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float,
                 max_decay_steps: int, verbosity_interval: int = 0) -> None:
        if max_decay_steps <= warm_up_steps:
            raise ValueError(f"max_decay_steps ({max_decay_steps}) must be larger than warm_up_steps ({warm_up_steps})")
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.last_lr = 0.0
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs: object) -> float:
        if n < self.lr_warm_up_steps:
            lr = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        else:
            t = min((n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps), 1.0)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1.0 + math.cos(t * math.pi))
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("step %d: lr multiplier %.4g", n, lr)
        self.last_lr = lr
        return lr

    def __call__(self, n: int, **kwargs: object) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Repeated cycles, each a linear warm-up from ``f_start`` to ``f_max`` then a cosine decay to ``f_min``.

    Args:
        warm_up_steps, f_min, f_max, f_start, cycle_lengths: one entry per cycle (same length lists).
            Cycle ``i`` covers ``cycle_lengths[i]`` steps; steps past the last cycle stay in the last one.
        verbosity_interval: log the multiplier every this many steps (0: never).
    """

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0) -> None:
        lists = {"warm_up_steps": warm_up_steps, "f_min": f_min, "f_max": f_max, "f_start": f_start,
                 "cycle_lengths": cycle_lengths}
        lengths = {name: len(value) for name, value in lists.items()}
        if len(set(lengths.values())) != 1 or lengths["cycle_lengths"] == 0:
            raise ValueError(f"scheduler lists must be non-empty and of equal length (one entry per cycle), got {lengths}")
        self.lr_warm_up_steps = list(warm_up_steps)
        self.f_start = list(f_start)
        self.f_min = list(f_min)
        self.f_max = list(f_max)
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = [0]
        for length in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + length)
        self.last_f = 0.0
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle step ``n`` falls in (a step equal to a cycle's end belongs to that cycle)."""
        for cycle, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return cycle
        return len(self.cycle_lengths) - 1

    def _after_warm_up(self, cycle: int, n: int) -> float:
        t = min((n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle]), 1.0)
        return self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1.0 + math.cos(t * math.pi))

    def schedule(self, n: int, **kwargs: object) -> float:
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if n < self.lr_warm_up_steps[cycle]:
            f = (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        else:
            f = self._after_warm_up(cycle, n)
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("step %d (cycle %d): lr multiplier %.4g", n, cycle, f)
        self.last_f = f
        return f

    def __call__(self, n: int, **kwargs: object) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """As :class:`LambdaWarmUpCosineScheduler2` but with a linear decay from ``f_max`` towards ``f_min``
    that reaches ``f_min`` at the end of each cycle.

    Args: as :class:`LambdaWarmUpCosineScheduler2`.
    """

    def _after_warm_up(self, cycle: int, n: int) -> float:
        length = self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length
