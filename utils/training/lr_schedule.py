"""The reference's learning-rate schedule: linear warm-up, then step decay.

The reference (``train.py``, ``set_lr``) changes the rate at the start of
iteration ``i``, before that iteration's update:

1. for ``i <= lr_warmup_until`` (when ``lr_warmup_until > 0``) it sets
   ``(lr - lr_warmup_init) * (i / lr_warmup_until) + lr_warmup_init``;
2. then, for every step ``s`` of ``lr_steps`` with ``i >= s`` not applied yet,
   it sets ``lr * gamma ** (number of steps applied)``;

and otherwise leaves the rate as it was. ``WarmupStepSchedule.lr_at`` gives
the rate that sequence of assignments has reached at iteration ``i`` of an
uninterrupted run. Being a function of the iteration alone, it lets a resumed
run continue the schedule exactly; nothing needs to be saved but the iteration.
"""
import bisect
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class WarmupStepSchedule:
    """Warm-up from ``warmup_init`` to ``base_lr`` over ``warmup_until`` iterations, then steps.

    Attributes:
        base_lr: the rate after warm-up and before the first step.
        gamma: factor applied at each step.
        steps: iterations at which the rate is multiplied by ``gamma`` (sorted).
        warmup_init: the rate at iteration 0 when ``warmup_until > 0``.
        warmup_until: last warm-up iteration; 0 disables warm-up.
    """
    base_lr: float
    gamma: float
    steps: Tuple[int, ...]
    warmup_init: float
    warmup_until: int

    @classmethod
    def from_config(cls, cfg, lr=None, gamma=None):
        """The schedule of a YolactConfig; ``lr``/``gamma`` override the config's (like the flags)."""
        return cls(base_lr=cfg.lr if lr is None else lr,
                   gamma=cfg.gamma if gamma is None else gamma,
                   steps=tuple(sorted(cfg.lr_steps)),
                   warmup_init=cfg.lr_warmup_init,
                   warmup_until=cfg.lr_warmup_until)

    def num_steps_passed(self, iteration):
        """How many steps of ``steps`` are at or before ``iteration``."""
        return bisect.bisect_right(self.steps, iteration)

    def lr_at(self, iteration):
        """The learning rate used for the update of ``iteration`` (0-based)."""
        passed = self.num_steps_passed(iteration)
        last_step = self.steps[passed - 1] if passed else None
        if self.warmup_until > 0:
            last_warmup = min(iteration, self.warmup_until)
            # A step assignment wins over the warm-up one at the same iteration
            # (the reference applies steps second); an earlier one is overwritten.
            if last_step is None or last_step < last_warmup:
                return ((self.base_lr - self.warmup_init) * (last_warmup / self.warmup_until)
                        + self.warmup_init)
        if last_step is None:
            return self.base_lr
        return self.base_lr * self.gamma ** passed
