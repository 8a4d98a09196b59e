"""Optimizer and schedule for a freeze plan: per stage a decayed and an undecayed group (as timm's
``param_groups_weight_decay``), all present from the first step, each with the plan's multiplier (``lr_scale``) and a
step-wise ``LambdaLR`` factor: 0 while fixed, then warm-up and cosine from its release (restored on resume)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .freeze import GroupPlan, Plan
from .recipe import Optim


def param_groups(model: torch.nn.Module, plan: Plan, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """The optimizer's groups: per plan stage, its decayed weights and its 1-D ones (named ``<stage>/no_decay``,
    without weight decay), at ``lr`` times the stage's multiplier."""
    plan.check(model)
    params = dict(model.named_parameters())
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = []
    for i, g in enumerate(plan.groups):
        flat = [n for n in g.params if params[n].ndim <= 1 or n.endswith(".bias") or n in skip]
        for names, wd, suffix in [([n for n in g.params if n not in flat], weight_decay, ""), (flat, 0.0, "/no_decay")]:
            if names:
                groups.append({"params": [params[n] for n in names], "name": g.name + suffix, "lr": lr * g.lr_mult,
                               "lr_scale": g.lr_mult, "weight_decay": wd, "stage": i})
    return groups


def lr_factor(g: GroupPlan, steps_per_epoch: int, epochs: int, warmup_epochs: float = 1.0, kind: str = "cosine",
              min_ratio: float = 0.01) -> Callable[[int], float]:
    """A group's learning rate at a step, as a factor of its own: 0 while fixed, then warm-up and cosine (or
    constant) over the epochs left after its release."""
    steps = max(1, steps_per_epoch)
    start = 0 if g.train_from is None or g.bn == "affine" else g.train_from * steps
    span = max(1, steps * epochs - start)
    warm = min(int(round(warmup_epochs * steps)), span // 2)

    def factor(step: int) -> float:
        if not g.live_at(step // steps):
            return 0.0
        t = step - start
        if t < warm:
            return (t + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (t - warm) / max(1, span - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build(model: torch.nn.Module, plan: Plan, o: Optim, steps_per_epoch: int, epochs: int
          ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW or SGD (nesterov) over :func:`param_groups`, with one :func:`lr_factor` per group."""
    groups = param_groups(model, plan, o.lr, o.weight_decay)
    opt = (torch.optim.AdamW(groups, lr=o.lr) if o.name == "adamw"
           else torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True))
    factors = [lr_factor(plan.groups[g["stage"]], steps_per_epoch, epochs, o.warmup_epochs, o.schedule,
                         o.min_lr_ratio) for g in groups]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factors)
