"""Distance to ImageNet: the squared Hellinger distance between each BN input's per-channel statistics on the target
images (model in eval mode) and the ImageNet statistics the BN layer holds, per stage and overall, calibrated to 0-1
(docs/distance.md; ``benchmarks/distance_table.py`` reproduces the calibration)."""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .stages import stages

__all__ = ["DistanceReport", "DistanceMeter", "distance", "measure_folder", "folder_batches", "reference_model",
           "prepare", "calibrate", "bn_layers", "NoBatchNormError", "REFERENCE", "CALIBRATION", "DEFAULT_MAX_IMAGES"]

#: The network the calibration was measured with; ``measure_folder`` uses it unless given another model.
REFERENCE = "tf_efficientnet_lite0"
#: raw -> ``clip((raw - low) / (high - low), 0, 1)``: raw 0 is ImageNet itself, ``high`` puts bccd_cells (the farthest
#: shared set) at 0.9 (docs/distance.md); other networks use these constants, so their raw scores compare among
#: themselves only.
CALIBRATION = {"tf_efficientnet_lite0": (0.0, 0.2235)}
#: Images measured by default: from 64 on the score varies by 0.015 (sd) between samples (docs/distance.md).
DEFAULT_MAX_IMAGES = 128
#: Below this many images the pooled statistics miss the between-image spread and the score reads too high.
MIN_IMAGES = 32

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
        """The score with how to read it, then the raw score of every stage."""
        width = max([len(k) for k in self.per_stage] + [7])
        lines = [f"distance to ImageNet: {self.overall:.2f} (0 = ImageNet's statistics, natural photos about 0.1, "
                 f"cell microscopy 0.8-0.9; raw {self.raw:.4f}, {self.n_images} images, {self.model or 'model'})"]
        if self.model not in CALIBRATION:
            lines.append(f"note: {self.model} has no calibration; scaled as {REFERENCE}, compare raw scores only "
                         f"among measurements with {self.model}")
        if self.n_images < MIN_IMAGES:
            lines.append(f"note: {self.n_images} images read farther than the data set is; measure {MIN_IMAGES} "
                         f"or more")
        lines.append(f"{'stage':<{width}}  raw (squared Hellinger distance to the BN statistics, 0-1)")
        lines += [f"{k:<{width}}  {v:.4f}" for k, v in self.per_stage.items()]
        return "\n".join(lines)

    __str__ = to_string


def bn_layers(model: torch.nn.Module) -> dict[str, torch.nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer (timm's BatchNormAct2d included) that keeps running statistics, by module name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, _BN) and m.track_running_stats and m.running_var is not None}


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in float64 (Chan et al.)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0  # the first batch's merge leaves its own moments exactly

    def add(self, x: torch.Tensor) -> None:
        k = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach().float(), dim=[0, *range(2, x.dim())], correction=0)
        mean, m2 = mean.double().cpu(), var.double().cpu() * k
        n = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.n * k / n)
        self.n = n


def hellinger2(mean_p: torch.Tensor, var_p: torch.Tensor, mean_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    """Elementwise squared Hellinger distance between 1-D Gaussians: 0 if equal, towards 1 as they stop overlapping."""
    s = var_p + var_q
    return 1 - torch.sqrt(2 * torch.sqrt(var_p * var_q) / s) * torch.exp(-(mean_p - mean_q) ** 2 / (4 * s))


def calibrate(raw: float, model_name: str = REFERENCE) -> float:
    """The raw score on the 0-1 scale of ``CALIBRATION`` (the reference network's when ``model_name`` has none)."""
    low, high = CALIBRATION.get(model_name, CALIBRATION[REFERENCE])
    return float(min(1.0, max(0.0, (raw - low) / (high - low))))


class DistanceMeter:
    """Streaming measurement: ``update`` with batches, ``report`` at any point (``distance`` in steps)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.bns = model, bn_layers(model)
        if not self.bns:
            raise NoBatchNormError(
                f"distance needs a network with BatchNorm (its running statistics are ImageNet's); "
                f"{type(model).__name__} has none. Measure with a BatchNorm backbone instead, e.g. "
                f"finetune.backbone.create_backbone('{REFERENCE}', num_classes=0), or measure_folder(), which uses it")
        self.moments = {n: _Moments() for n in self.bns}
        self.n_images = 0
        self._stages = stages(model)

    def update(self, x: torch.Tensor) -> None:
        """Run one normalised batch through the model in eval mode, adding its BN inputs' statistics."""
        hooks = [bn.register_forward_pre_hook(lambda mod, args, acc=self.moments[n]: acc.add(args[0]))
                 for n, bn in self.bns.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                self.model(x.to(next(self.model.parameters()).device))
        finally:
            for h in hooks:
                h.remove()
            self.model.train(was_training)
        self.n_images += len(x)

    def report(self) -> DistanceReport:
        if self.n_images == 0:
            raise ValueError("distance needs at least one image")
        per_layer = {}
        for n, bn in self.bns.items():
            ref_var = bn.running_var.detach().double().cpu()
            keep = ref_var > 0  # pruned channels hold variance exactly 0: nothing to compare
            acc = self.moments[n]
            if keep.any() and acc.n:
                h = hellinger2(bn.running_mean.detach().double().cpu()[keep], ref_var[keep] + bn.eps,
                               acc.mean[keep], (acc.m2 / acc.n)[keep] + bn.eps)
                per_layer[n] = float(h.mean())
        if not per_layer:
            raise ValueError("no BatchNorm channel with a running variance above 0: nothing to compare")
        groups: dict[str, list[float]] = {s.name: [] for s in self._stages} | {"other": []}
        for n, v in per_layer.items():
            owner = (s.name for s in self._stages if any(n == m or n.startswith(m + ".") for m in s.modules))
            groups[next(owner, "other")].append(v)  # other: a BN without parameters
        per_stage = {k: sum(v) / len(v) for k, v in groups.items() if v}
        raw = sum(per_stage.values()) / len(per_stage)
        cfg = getattr(self.model, "pretrained_cfg", None) or getattr(self.model, "default_cfg", None) or {}
        name = cfg.get("architecture", type(self.model).__name__)
        return DistanceReport(overall=calibrate(raw, name), raw=raw, per_stage=per_stage, n_images=self.n_images,
                              model=name, per_layer=per_layer)


def distance(model: torch.nn.Module, images: torch.Tensor | Iterable, *, batch_size: int = 32,
             max_images: int | None = None) -> DistanceReport:
    """Distance to ImageNet, as ``model``'s BatchNorm statistics see it, of ``images``: a normalised (N, C, H, W)
    tensor (see :func:`prepare`) or an iterable of such batches (a DataLoader's ``(x, y)`` batches too)."""
    meter = DistanceMeter(model)
    for x in images.split(batch_size) if isinstance(images, torch.Tensor) else images:
        x = x[0] if isinstance(x, (list, tuple)) else x
        if max_images is not None:
            x = x[:max_images - meter.n_images]
        if len(x) == 0:
            break
        meter.update(x)
    return meter.report()


def prepare(images: Sequence[np.ndarray], model: torch.nn.Module, *, recipe=None) -> torch.Tensor:
    """Arrays (HxW gray or HxWx3/4 RGB(A); integers or float in [0, 1]) as the evaluation pipeline of ``recipe``
    (default: the default recipe) makes them for ``model``."""
    from .augment import build_transforms, data_config, read_channels
    from .recipe import Recipe

    recipe = recipe or Recipe()
    tf = build_transforms(recipe, data_config(recipe, model), train=False)
    return torch.stack([tf(image=_unit_float(a, read_channels(recipe)))["image"] for a in images])


def measure_folder(root: str | Path | None, recipe=None, *, csv: str | Path | None = None,
                   model: torch.nn.Module | None = None, max_images: int = DEFAULT_MAX_IMAGES, batch_size: int = 32,
                   seed: int = 0) -> DistanceReport:
    """Distance to ImageNet of a seeded sample of ``max_images`` of a dataset's files, read as the evaluation pipeline
    does, measured with ``model`` (default: the calibrated reference network, whatever the recipe trains)."""
    model = reference_model(recipe) if model is None else model
    return distance(model, folder_batches(root, model, recipe, csv=csv, max_images=max_images,
                                          batch_size=batch_size, seed=seed))


def reference_model(recipe=None) -> torch.nn.Module:
    """The calibrated network (``REFERENCE``, ImageNet weights, no head), its stem adapted as ``recipe`` asks."""
    from .augment import model_channels
    from .backbone import create_backbone
    from .recipe import Recipe

    return create_backbone(REFERENCE, num_classes=0, in_chans=model_channels(recipe or Recipe()))


def folder_batches(root: str | Path | None, model: torch.nn.Module, recipe=None, *, csv: str | Path | None = None,
                   max_images: int = DEFAULT_MAX_IMAGES, batch_size: int = 32, seed: int = 0) -> Iterator[torch.Tensor]:
    """Normalised batches of a seeded random sample of a dataset's images (every class mixed in), as the
    evaluation pipeline of ``recipe`` makes them for ``model``; files that fail to decode are left out."""
    from . import augment
    from .data import scan
    from .images import ImageError, dataset_percentiles
    from .preprocess import Pipeline, Preprocess
    from .recipe import Recipe

    recipe = recipe or Recipe()
    im, channels = recipe.image, augment.read_channels(recipe)
    paths = scan(root, csv=csv, channels=channels, decode=False, allow_outside=recipe.train.allow_outside,
                 max_bad_fraction=recipe.train.max_bad_fraction).items["path"].tolist()
    random.Random(seed).shuffle(paths)
    paths = paths[:max_images]
    stats = dataset_percentiles(paths, channels, im.percentiles, max_pixels=im.max_pixels) \
        if im.intensity == "dataset" else None
    pre = Preprocess(channels, im.intensity, im.percentiles, stats, im.max_pixels)
    tf = Pipeline(augment.build_transforms(recipe, augment.data_config(recipe, model), train=False))

    for i in range(0, len(paths), batch_size):
        xs = []
        for path in paths[i:i + batch_size]:
            with contextlib.suppress(ImageError):  # scan read headers only: a truncated file shows up here
                xs.append(pre.load(path, tf))
        if xs:
            yield torch.stack(xs)


def _unit_float(a: np.ndarray, channels: int) -> np.ndarray:
    """HxWx``channels`` float32 in [0, 1]: integers divided by their dtype's max, alpha dropped, gray copied to
    RGB for 3 channels, RGB averaged for 1."""
    a = np.asarray(a)
    a = a.astype(np.float32) / np.iinfo(a.dtype).max if np.issubdtype(a.dtype, np.integer) else a.astype(np.float32)
    a = a[..., None] if a.ndim == 2 else a[..., :3]
    if a.shape[-1] != channels:
        a = np.repeat(a, channels, axis=-1) if a.shape[-1] == 1 else a.mean(axis=-1, keepdims=True)
    return np.ascontiguousarray(a)
