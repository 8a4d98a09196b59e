"""Distance to ImageNet, measured: how far target images' activation statistics are from the ones a pretrained
network's BatchNorm layers hold (ImageNet's), per stage and overall, on a calibrated 0-1 scale.

No ImageNet data is needed: each BN layer's ``running_mean``/``running_var`` are ImageNet's statistics of that
layer's input. The network runs in eval mode (every layer normalises with ImageNet's statistics, as when the
model is deployed), hooks collect each BN input's per-channel mean and variance over the target images, and each
channel's two 1-D Gaussians are compared by the squared Hellinger distance (0 identical, 1 disjoint). The rule
and the measured scores are in docs/distance.md; ``benchmarks/distance_table.py`` reproduces the calibration.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .stages import stages

__all__ = ["DistanceReport", "distance", "measure_folder", "prepare", "calibrate", "bn_layers", "NoBatchNormError",
           "REFERENCE", "CALIBRATION", "DEFAULT_MAX_IMAGES"]

#: The network the calibration was measured with; ``measure_folder`` uses it unless given another model.
REFERENCE = "tf_efficientnet_lite0"
#: raw -> calibrated is ``clip((raw - low) / (high - low), 0, 1)``. Measured by benchmarks/distance_table.py with
#: tf_efficientnet_lite0 (packaged ImageNet weights) at 224 px, 256 images a set (docs/distance.md): ``low`` puts
#: hymenoptera (ImageNet's own ants and bees) at 0.1, ``high`` puts mitocheck_cells (widefield fluorescence) at 0.9.
CALIBRATION = {"tf_efficientnet_lite0": (0.0, 1.0)}
#: Images measured by default: the calibrated score moves by less than 0.02 from 256 to all images of a set.
DEFAULT_MAX_IMAGES = 256

_BN = torch.nn.modules.batchnorm._BatchNorm


class NoBatchNormError(ValueError):
    """The model has no BatchNorm layer with running statistics, so it holds no ImageNet statistics to compare."""


@dataclass
class DistanceReport:
    """The measured distance: ``overall`` calibrated to [0, 1], ``raw`` the mean squared Hellinger distance over
    stages, ``per_stage`` each stage's raw score (mean over its BN layers), ``per_layer`` each BN layer's."""

    overall: float
    raw: float
    per_stage: dict[str, float]
    n_images: int
    model: str = ""
    per_layer: dict[str, float] = field(default_factory=dict, repr=False)

    def table(self) -> list[dict]:
        """One row per stage, then the overall row."""
        rows = [{"stage": k, "raw": round(v, 4)} for k, v in self.per_stage.items()]
        return rows + [{"stage": "overall", "raw": round(self.raw, 4), "calibrated": round(self.overall, 4)}]

    def to_string(self) -> str:
        width = max([len(k) for k in self.per_stage] + [7])
        lines = [f"distance to ImageNet: {self.overall:.2f} (0 = ImageNet-like photos, 1 = far; raw {self.raw:.4f}, "
                 f"{self.n_images} images, measured with {self.model or 'the given model'})",
                 f"{'stage':<{width}}  raw (squared Hellinger, BN statistics vs ImageNet's)"]
        lines += [f"{k:<{width}}  {v:.4f}" for k, v in self.per_stage.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()


def bn_layers(model: torch.nn.Module) -> dict[str, torch.nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer (timm's BatchNormAct2d included) that keeps running statistics, by module name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, _BN) and m.track_running_stats and m.running_var is not None}


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in float64 (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        k = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
        mean, m2 = mean.double().cpu(), var.double().cpu() * k
        if self.mean is None:
            self.n, self.mean, self.m2 = k, mean, m2
            return
        n = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.n * k / n)
        self.n = n

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.n


def hellinger2(mean_p: torch.Tensor, var_p: torch.Tensor, mean_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    """Squared Hellinger distance between 1-D Gaussians N(mean_p, var_p) and N(mean_q, var_q), elementwise, in [0, 1]."""
    s = var_p + var_q
    return 1 - torch.sqrt(2 * torch.sqrt(var_p * var_q) / s) * torch.exp(-(mean_p - mean_q) ** 2 / (4 * s))


def calibrate(raw: float, model_name: str = REFERENCE) -> float:
    """The raw score on the 0-1 scale of ``CALIBRATION`` (the reference network's when ``model_name`` has none)."""
    low, high = CALIBRATION.get(model_name, CALIBRATION[REFERENCE])
    return float(min(1.0, max(0.0, (raw - low) / (high - low))))


def distance(model: torch.nn.Module, images: torch.Tensor | Iterable, *, batch_size: int = 32,
             max_images: int | None = None) -> DistanceReport:
    """Distance of ``images`` to ImageNet as ``model``'s BatchNorm statistics see it.

    ``images``: a normalised (N, C, H, W) tensor (see :func:`prepare`) or an iterable of such batches (a
    DataLoader's ``(x, y)`` batches too). The model runs in eval mode and is left in the mode it came in.
    """
    bns = bn_layers(model)
    if not bns:
        raise NoBatchNormError(
            f"distance needs a network with BatchNorm (its running statistics are ImageNet's); "
            f"{type(model).__name__} has none. Measure with a BatchNorm backbone instead, e.g. "
            f"finetune.backbone.create_backbone('{REFERENCE}', num_classes=0), or measure_folder(), which uses it")
    moments = {n: _Moments() for n in bns}
    hooks = [bn.register_forward_pre_hook(lambda mod, args, acc=moments[n]: acc.add(args[0]))
             for n, bn in bns.items()]
    was_training = model.training
    device = next(model.parameters()).device
    seen = 0
    model.eval()
    try:
        with torch.inference_mode():
            for x in _batches(images, batch_size):
                if max_images is not None:
                    x = x[:max_images - seen]
                if len(x) == 0:
                    break
                model(x.to(device))
                seen += len(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("distance needs at least one image")
    per_layer = {}
    for n, bn in bns.items():
        ref_var = bn.running_var.detach().double().cpu()
        keep = ref_var > 0  # pruned channels hold variance exactly 0: nothing to compare
        if not keep.any():
            continue
        acc, eps = moments[n], bn.eps
        h = hellinger2(bn.running_mean.detach().double().cpu()[keep], ref_var[keep] + eps,
                       acc.mean[keep], acc.var[keep] + eps)
        per_layer[n] = float(h.mean())
    per_stage = {}
    for s in stages(model):
        values = [v for n, v in per_layer.items() if any(n == m or n.startswith(m + ".") for m in s.modules)]
        if values:
            per_stage[s.name] = sum(values) / len(values)
    raw = sum(per_stage.values()) / len(per_stage)
    name = _model_name(model)
    return DistanceReport(overall=calibrate(raw, name), raw=raw, per_stage=per_stage, n_images=seen, model=name,
                          per_layer=per_layer)


def prepare(images: Sequence[np.ndarray], model: torch.nn.Module, *, size: int | None = None,
            recipe=None) -> torch.Tensor:
    """Arrays (HxW gray, HxWx3 or HxWx4 RGB(A); uint8/uint16 or float in [0, 1]) as the training pipeline's eval
    transform makes them: the model's data config (resize, centre crop, mean/std), gray copied to 3 channels."""
    from .augment import build_transforms, data_config
    from .recipe import Recipe

    recipe = recipe or Recipe()
    if size is not None:
        recipe = recipe.override({"image.size": size})
    tf = build_transforms(recipe, data_config(recipe, model), train=False)
    return torch.stack([tf(image=_unit_rgb(a))["image"] for a in images])


def measure_folder(root: str | Path, recipe=None, *, model: torch.nn.Module | None = None,
                   max_images: int = DEFAULT_MAX_IMAGES, batch_size: int = 32, seed: int = 0) -> DistanceReport:
    """Distance to ImageNet of the images under ``root`` (``finetune distance DATA``): a seeded random sample
    of ``max_images``, read and transformed as training's eval pipeline does, measured with ``model`` (default:
    the calibrated reference network, whatever the recipe trains)."""
    from .data import ImageDataset, scan

    if model is None:
        from .backbone import create_backbone

        model = create_backbone(REFERENCE, num_classes=0)
    items = scan(root)
    raise NotImplementedError(items)


def _batches(images: torch.Tensor | Iterable, batch_size: int):
    if isinstance(images, torch.Tensor):
        images = images.split(batch_size)
    for x in images:
        yield x[0] if isinstance(x, (list, tuple)) else x


def _unit_rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / np.iinfo(a.dtype).max
    a = a.astype(np.float32)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a)


def _model_name(model: torch.nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg.get("architecture", type(model).__name__)
