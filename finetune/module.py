"""The LightningModule: a timm model, its loss and metrics, and the freeze plan kept in every checkpoint."""
from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassRecall, MultilabelAveragePrecision,
                                         MultilabelF1Score, MultilabelPrecisionRecallCurve)

from . import multilabel, optim
from .freeze import Plan, adapt_bn, hold_eval, set_trainable
from .recipe import Recipe


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, for example); the message says what to change."""


class Classifier(pl.LightningModule):
    """A timm model with a new head, label smoothing, per-group rates and torchmetrics; multi-label: sigmoid outputs,
    BCE, mean average precision, and each label's best-F1 validation threshold in every checkpoint."""

    def __init__(self, model: torch.nn.Module, plan: Plan, recipe: Recipe, classes: list[str],
                 class_weights: torch.Tensor | None = None, extra: dict | None = None):
        super().__init__()
        self.model, self.plan, self.recipe, self.classes = model, plan, recipe, list(classes)
        self.extra = dict(extra or {})  # travels in every checkpoint: data config, eval pipeline, ...
        n, smooth, self.multi = len(classes), recipe.loss.label_smoothing, recipe.train.labels == "multi"
        if self.multi:
            self.loss_fn = _SmoothedBCE(class_weights, smooth)
            metrics = {"map": MultilabelAveragePrecision(n, average="macro"),
                       "f1": MultilabelF1Score(n, average="macro")}
            self.val_curve, self.thresholds = MultilabelPrecisionRecallCurve(n), [0.5] * n
        else:
            self.loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=smooth)
            metrics = {"acc": MulticlassAccuracy(n, average="micro"), "recall": MulticlassRecall(n, average="macro")}
            if n > 5:
                metrics["top5"] = MulticlassAccuracy(n, top_k=5, average="micro")
        self.val_metrics = MetricCollection(metrics, prefix="val_")
        self.train_acc = MultilabelF1Score(n, average="macro") if self.multi else MulticlassAccuracy(n, average="micro")
        self.train_loss = MeanMetric()  # the step value stays local; the epoch mean is reduced over ranks once
        self._epoch: int | None = None  # the epoch whose plan is in force
        # not a registered child: the state dict holds the model once, under "model."
        object.__setattr__(self, "_forward", torch.compile(model) if recipe.train.compile else model)

    def train(self, mode: bool = True) -> Classifier:
        """``nn.Module.train``, then the plan's fixed groups (and BN not in 'train' mode) back to eval."""
        super().train(mode)
        hold_eval(self.model, self.plan, self.current_epoch)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x)

    def setup(self, stage: str) -> None:
        if self.recipe.train.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        set_trainable(self.model, self.plan, self.current_epoch)
        if not self.plan.adapted:
            adapt_bn(self.model, self.plan, getattr(self.trainer.datamodule, "adapt_dataloader", list)())

    def on_train_epoch_start(self) -> None:
        """A new sample order every epoch, on any Lightning version (ours sets it, not Lightning's wrapper)."""
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.current_epoch)

    on_train_start = on_train_epoch_start  # after a resume, Lightning skips the first on_train_epoch_start

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._epoch == self.current_epoch:
            return
        self._epoch = self.current_epoch
        set_trainable(self.model, self.plan, self.current_epoch)
        self.train()
        t = self.recipe.train
        if t.deterministic:  # seeded here, after the loader drew from the RNG: the same in a resumed run
            pl.seed_everything(t.seed * 1000 + self.current_epoch, workers=True, verbose=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["finetune"] = {"recipe": self.recipe.to_dict(), "classes": self.classes,
                                  "plan": self.plan.state_dict(), **self.extra,
                                  **({"thresholds": list(self.thresholds)} if self.multi else {})}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.plan.load_state_dict(checkpoint["finetune"]["plan"])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                f"the last good checkpoint is kept. Lower optim.lr (now {self.recipe.optim.lr:g}), try "
                f"train.precision: 32-true, or check the data for broken images.")
        self.train_acc(logits.detach(), y)
        self.train_loss(loss.detach(), len(y))
        self.log("train_loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_f1" if self.multi else "train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss_fn(logits, y), on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(y))
        self.val_metrics.update(logits, y.int() if self.multi else y)
        self.log_dict(self.val_metrics, on_epoch=True, prog_bar=True, batch_size=len(y))
        if self.multi:
            self.val_curve.update(logits.sigmoid(), y.int())

    def on_validation_epoch_end(self) -> None:
        if self.multi:  # thresholds of this epoch's model, saved with it (the best checkpoint carries its own)
            self.thresholds = multilabel.thresholds_from_curve(self.val_curve.compute())
            self.val_curve.reset()

    def configure_optimizers(self) -> dict:
        steps = max(1, math.ceil(self.trainer.estimated_stepping_batches / max(1, self.trainer.max_epochs)))
        opt, sched = optim.build(self.model, self.plan, self.recipe.optim, steps, self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _SmoothedBCE(torch.nn.Module):
    """Binary cross-entropy on logits with label smoothing (targets pulled toward 1/2) and optional positive weights."""

    def __init__(self, pos_weight: torch.Tensor | None, smoothing: float):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float() * (1 - self.smoothing) + self.smoothing / 2
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)
