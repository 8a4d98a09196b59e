"""Cached features for linear probes: the frozen backbone's pre-logits features of every image in
``$FINETUNE_HOME/features/<key>.pt``, keyed by a sha256 of model, weights, preprocessing and files (never stale)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pandas as pd
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import drop_failed
from .datamodule import ImageDataModule
from .fileio import atomic_write, finetune_home
from .freeze import Plan, adapt_bn
from .module import Classifier
from .recipe import Recipe
from .run import load_checkpoint
from .stages import stages

log = logging.getLogger("finetune")
FORMAT = 1  # bump when what a cache file holds changes: older files then miss


def decide(recipe: Recipe, plan: Plan, train_pipeline: dict, eval_pipeline: dict) -> tuple[bool, str]:
    """Whether to train on cached features (``auto``: only where that changes nothing but speed; ``true``: any linear
    probe, skipping augmentation and batch statistics), and the reason in one line, logged."""
    setting, augmented = recipe.train.cache_features, train_pipeline != eval_pipeline
    live_bn = [g.name for g in plan.groups if g.kind != "head" and g.bn == "train"]
    use = warn = False
    if setting is False:
        why = "train.cache_features is false"
    elif not plan.is_probe:
        why, warn = ("the plan trains backbone groups, so their features change every step (only linear probes are "
                     "cached; the fixed prefix still costs a forward pass only)"), setting is True
    elif setting is True:
        skipped = [w for w, on in [("the training augmentation", augmented),
                                   (f"batch statistics in BN of {', '.join(live_bn)}", live_bn)] if on]
        use, warn = True, bool(skipped)
        why = ("train.cache_features is true: the linear probe trains on cached features of the evaluation pipeline"
               + (f"; skipped: {' and '.join(skipped)}" if skipped else ""))
    elif augmented:
        why = ("the training pipeline is not the evaluation pipeline (augmentation), so features differ every epoch; "
               "train.cache_features=true trains this linear probe on cached features of un-augmented images "
               "instead (20x or more faster an epoch)")
    elif live_bn:
        why = f"BN of {', '.join(live_bn)} uses batch statistics (freeze.bn: train), so features vary by batch"
    else:
        use, why = True, ("linear probe whose training pipeline is the evaluation pipeline: the backbone's features "
                          "are computed once and cached")
    if plan.is_probe or setting is True:
        log.log(logging.WARNING if warn else logging.INFO, "features: %s", why)
    return use, why


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of the state dict without the classifier head (the head does not change the features)."""
    head = {p for s in stages(model) if s.kind == "head" for p in s.params}
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name in head:
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(model_name: str, weights: str, preprocess: dict, items: pd.DataFrame) -> str:
    """sha256 over the model name, weights hash, preprocessing and every file's path, label, split, size and mtime."""
    h = hashlib.sha256()
    meta = {"format": FORMAT, "timm": timm.__version__, "model": model_name, "weights": weights,
            "preprocess": preprocess}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for path, label, split in zip(items["path"], items["label"], items["split"]):
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{split}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(key: str) -> Path:
    return finetune_home() / "features" / f"{key}.pt"


@torch.no_grad()
def extract(model: torch.nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> tuple:
    """Pre-logits features and labels of every batch, the model in eval mode (restored afterwards)."""
    was = model.training
    model.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            feats.append(model.forward_head(model.forward_features(x.to(device)), pre_logits=True).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was)
    return torch.cat(feats), torch.cat(labels)


def load_or_compute(model: torch.nn.Module, images: ImageDataModule, key: str,
                    device: torch.device | str = "cpu") -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], bool]:
    """The cached features of every split present, and whether they came from the cache."""
    path = cache_path(key)
    if path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if data.get("key") == key:
                return {s: (d["features"], d["labels"]) for s, d in data["splits"].items()}, True
        except Exception as e:  # noqa: BLE001 - a broken cache file is recomputed, never trusted
            log.warning("feature cache %s is unreadable (%s); computing the features again", path, e)
    model.to(device)
    splits = {}
    for split in ("train", "val", "test"):
        if len(ds := images.dataset(split)):
            splits[split] = extract(model, DataLoader(ds, batch_size=images.batch_size,
                                                      num_workers=images.num_workers, collate_fn=drop_failed), device)
    state = {"key": key, "splits": {s: {"features": f, "labels": y} for s, (f, y) in splits.items()}}
    atomic_write(path, lambda file: torch.save(state, file))
    return splits, False


class HeadClassifier(Classifier):
    """A :class:`Classifier` whose batches are features: only the head (after the model's dropout) runs.
    Images still go through the whole model, so a checkpoint predicts images as any other does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return super().forward(x)
        return self.model.get_classifier()(F.dropout(x, self.recipe.backbone.drop_rate, self.training))


def cached_training(model: torch.nn.Module, plan: Plan, recipe: Recipe, preprocess: dict, items: pd.DataFrame,
                    images: ImageDataModule, ckpt: str | Path | None = None,
                    device: torch.device | str = "cpu") -> tuple[ImageDataModule, dict]:
    """The data module, now over cached features, and a record of the cache (key, path, hit); the checkpoint's
    weights (on resume) and AdaBN come first, as the features depend on them."""
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        model.load_state_dict({k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")})
        plan.load_state_dict(state["finetune"]["plan"])
    if not plan.adapted:
        adapt_bn(model, plan, images.adapt_dataloader())
    key = cache_key(recipe.backbone.name, weights_hash(model), preprocess, items)
    splits, hit = load_or_compute(model, images, key, device)
    model.to("cpu")
    info = {"key": key, "path": str(cache_path(key)), "hit": hit,
            "dim": int(splits["train"][0].shape[1]), "images": {s: len(y) for s, (_, y) in splits.items()}}
    log.info("features %s %s", "loaded from" if hit else "computed and cached in", info["path"])
    images.features = splits
    return images, info
