"""How a plan acts on a model: which weights train at an epoch, fixed groups held in eval mode by :func:`hold_eval`
after each ``train()`` (as mmdetection's ``norm_eval``; no hooks, so ``torch.compile`` sees a plain model), AdaBN."""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator

import torch

from .plan import GroupPlan, Plan

_BN = torch.nn.modules.batchnorm._BatchNorm


def _modules(model: torch.nn.Module, g: GroupPlan) -> Iterator[torch.nn.Module]:
    named = dict(model.named_modules())
    for m in g.modules:
        yield from named[m].modules()


def trainable(model: torch.nn.Module, plan: Plan, epoch: int | None = None) -> set[str]:
    """Names of the parameters that train at ``epoch``; ``None``: in any epoch (what DDP must register)."""
    plan.check(model)
    ids = {id(p) for g in plan.groups if g.train_from is not None and (epoch is None or g.trains_at(epoch))
           for p in (dict(model.named_parameters())[n] for n in g.params)}
    ids |= {id(p) for g in plan.groups if g.bn == "affine" for m in _modules(model, g) if isinstance(m, _BN)
            for p in m.parameters(recurse=False)}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def set_trainable(model: torch.nn.Module, plan: Plan, epoch: int | None) -> None:
    """``requires_grad`` as the plan says for ``epoch`` (``None``: every parameter that may ever train)."""
    live = trainable(model, plan, epoch)
    for name, p in model.named_parameters():
        p.requires_grad_(name in live)


def hold_eval(model: torch.nn.Module, plan: Plan, epoch: int) -> None:
    """Put what the plan holds at ``epoch`` in eval mode: every module of a fixed group, and BatchNorm that is not
    in 'train' mode. Call right after ``model.train()``; does nothing to a model in eval mode."""
    if not model.training:
        return
    for g in plan.groups:
        live = g.trains_at(epoch)
        for mod in _modules(model, g):
            if (g.bn != "train") if isinstance(mod, _BN) else not live:
                mod.training = False


def apply(model: torch.nn.Module, plan: Plan, epoch: int = 0) -> None:
    """``requires_grad`` and train/eval modes for ``epoch`` (outside Lightning: the module's ``train`` holds)."""
    set_trainable(model, plan, epoch)
    if model.training:
        model.train()
        hold_eval(model, plan, epoch)


def adapt_bn(model: torch.nn.Module, plan: Plan, batches: Iterable, max_batches: int = 50) -> int:
    """AdaBN: re-estimate the running statistics of the 'adapt' groups on target images (every other module in eval
    mode, modes restored after); returns the number of images seen."""
    bns = [m for g in plan.groups if g.bn == "adapt" for m in _modules(model, g) if isinstance(m, _BN)]
    modes, momenta = {m: m.training for m in model.modules()}, [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over all batches seen
        bn.train()
    seen, device = 0, next(model.parameters()).device
    with torch.no_grad():
        for x in islice(batches if bns else (), max_batches):
            x = x[0] if isinstance(x, (list, tuple)) else x
            model(x.to(device))
            seen += len(x)
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    for m, training in modes.items():
        m.training = training
    plan.adapted = True
    return seen
