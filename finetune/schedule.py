"""Learning-rate curves per param group: warm-up then cosine, each group's curve starting when the plan
releases it, scaled by the plan's multiplier (0 while a group is fixed)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .freeze import Plan


def group_lr_lambdas(plan: Plan, steps_per_epoch: int, epochs: int, warmup_epochs: float = 1.0,
                     kind: str = "cosine", min_ratio: float = 0.01) -> list[Callable[[int], float]]:
    """One ``LambdaLR`` factor per plan group: ``factor(step) * base_lr`` is that group's learning rate."""
    total = max(1, steps_per_epoch * epochs)

    def make(i: int) -> Callable[[int], float]:
        g = plan.groups[i]
        start = 0 if g.train_from is None else g.train_from * steps_per_epoch
        span = max(1, total - start)
        warm = min(int(round(warmup_epochs * steps_per_epoch)), span // 2)

        def factor(step: int) -> float:
            mult = plan.lr_mults(step // max(1, steps_per_epoch))[i]
            if mult == 0.0:
                return 0.0
            t = step - start
            if t < warm:
                return mult * (t + 1) / warm
            if kind == "constant":
                return mult
            progress = min(1.0, (t - warm) / max(1, span - warm))
            return mult * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

        return factor

    return [make(i) for i in range(len(plan.groups))]


def scheduler(optimizer: torch.optim.Optimizer, plan: Plan, steps_per_epoch: int, epochs: int,
              warmup_epochs: float = 1.0, kind: str = "cosine", min_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """A step-wise ``LambdaLR`` over the plan's groups (the optimizer's groups must be the plan's, in order)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, group_lr_lambdas(plan, steps_per_epoch, epochs, warmup_epochs, kind, min_ratio))
