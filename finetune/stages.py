"""Stages of any timm model: timm's ``group_matcher(coarse=True)`` groups (a freeze decision is per stage), stem
first, with the classifier (``get_classifier()``, the layer a new task replaces) split out as the last group."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
from timm.models._manipulate import group_parameters


@dataclass(frozen=True)
class Stage:
    """One group of parameters and the modules that own them."""

    name: str
    kind: str  # "stem", "stage" or "head"
    params: tuple[str, ...]
    modules: tuple[str, ...]  # outermost modules wholly inside this group, in model order


def stages(model: torch.nn.Module) -> list[Stage]:
    """Ordered groups of ``model``: stem, the stages from input to output, then the classifier head."""
    names = [n for n, _ in model.named_parameters()]
    head_params = _classifier_params(model)
    if hasattr(model, "group_matcher"):
        grouped = group_parameters(model, model.group_matcher(coarse=True))
        groups = [[p for p in ps if p not in head_params] for _, ps in sorted(grouped.items())]
    else:  # a plain torch module: one group per top-level child (named_parameters lists each child's together)
        body = [n for n in names if n not in head_params]
        groups = [list(g) for _, g in itertools.groupby(body, key=lambda n: n.split(".")[0])]
    groups = [g for g in groups if g] + ([[p for p in names if p in head_params]] if head_params else [])
    modules = _outer_modules(model, {p: i for i, g in enumerate(groups) for p in g}, len(groups))
    out = []
    for i, g in enumerate(groups):
        kind = "head" if head_params and i == len(groups) - 1 else ("stem" if i == 0 else "stage")
        name = kind if kind != "stage" else _label(g, modules[i])
        out.append(Stage(name=name, kind=kind, params=tuple(g), modules=tuple(modules[i])))
    return out


def _classifier_params(model: torch.nn.Module) -> set[str]:
    """Parameter names of the module timm calls the classifier (empty if there is none)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    prefix = next((name for name, mod in model.named_modules() if mod is head), None)
    if not isinstance(head, torch.nn.Module) or prefix is None:
        return set()
    return {f"{prefix}.{p}" if prefix else p for p, _ in head.named_parameters()}


def _outer_modules(model: torch.nn.Module, owner: dict[str, int], n: int) -> list[list[str]]:
    """For each group, the outermost modules whose parameters all belong to it (parameter-free modules
    such as activations and DropPath follow their parent)."""
    group_of: dict[str, int | None] = {}
    for name, mod in list(model.named_modules())[1:]:  # the model itself is no group's module
        ids = {owner[f"{name}.{p}"] for p, _ in mod.named_parameters() if f"{name}.{p}" in owner}
        group_of[name] = (ids.pop() if len(ids) == 1 else None) if ids else group_of.get(name.rpartition(".")[0])
    out: list[list[str]] = [[] for _ in range(n)]
    for name, g in group_of.items():
        parent = name.rpartition(".")[0]
        if g is not None and (not parent or group_of.get(parent) != g):
            out[g].append(name)
    return out


def _label(params: list[str], modules: list[str]) -> str:
    """A readable name for a group: its outer modules (``blocks.3``, ``layer2``), or their common prefix."""
    if 0 < len(modules) <= 3:
        return "+".join(modules)
    split = [p.split(".")[:-1] for p in params]
    if common := os.path.commonprefix(split):
        return ".".join(common)
    parts: list[str] = []
    for bits in split:
        key = ".".join(bits[:2]) if len(bits) > 1 and bits[1].isdigit() else (bits[0] if bits else "")
        if key and key not in parts:
            parts.append(key)
    return "+".join(parts[:3]) + ("+..." if len(parts) > 3 else "")
