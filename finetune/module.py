"""Lightning wiring: the classifier module and the callback that carries the freeze plan through training.

The module holds the model, the loss and the metrics; the policy lives in :class:`finetune.freeze.Plan`,
driven by :class:`FreezeSchedule`, which works with any LightningModule that keeps its network in ``.model``.
"""
from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

from .freeze import Plan
from .recipe import Recipe
from .schedule import scheduler


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, for example); the message says what to change."""


class FreezeSchedule(pl.Callback):
    """Applies the plan at every epoch start, re-estimates BN statistics once (AdaBN) and keeps the plan's
    state in the checkpoint, so a resumed run continues the schedule where it stopped."""

    def __init__(self, plan: Plan, adapt_loader: Any = None, attr: str = "model", seed: int | None = None):
        self.plan, self.adapt_loader, self.attr, self.seed = plan, adapt_loader, attr, seed
        self._epoch: int | None = None  # the epoch whose first batch has been seen

    def _model(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        return getattr(pl_module, self.attr)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._model(pl_module)
        self.plan.apply(model, trainer.current_epoch)
        if not self.plan.adapted and self.adapt_loader is not None:
            loader = self.adapt_loader() if callable(self.adapt_loader) else self.adapt_loader
            self.plan.adapt_bn(model, loader)
            self.plan.apply(model, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plan.apply(self._model(pl_module), trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._epoch == trainer.current_epoch:
            return
        self._epoch = trainer.current_epoch
        # Lightning skips on_train_epoch_start in the first epoch after resuming from an epoch-end checkpoint
        self.plan.apply(self._model(pl_module), trainer.current_epoch)
        if self.seed is not None:  # seeded here, after the loader drew from the RNG: the same in a resumed run
            pl.seed_everything(self.seed * 1000 + trainer.current_epoch, workers=True, verbose=False)

    def state_dict(self) -> dict:
        return self.plan.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.plan.load_state_dict(state_dict)


class Classifier(pl.LightningModule):
    """A timm model with a new head, trained with label smoothing, per-group learning rates and torchmetrics."""

    def __init__(self, model: torch.nn.Module, plan: Plan, recipe: Recipe, classes: list[str],
                 class_weights: torch.Tensor | None = None, extra: dict | None = None):
        super().__init__()
        self.model, self.plan, self.recipe, self.classes = model, plan, recipe, list(classes)
        self.extra = dict(extra or {})  # travels in every checkpoint: data config, eval pipeline, ...
        self.loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=recipe.loss.label_smoothing)
        n = len(classes)
        metrics = {"acc": MulticlassAccuracy(n, average="micro"), "recall": MulticlassRecall(n, average="macro")}
        if n > 5:
            metrics["top5"] = MulticlassAccuracy(n, top_k=5, average="micro")
        self.val_metrics = MetricCollection(metrics, prefix="val_")
        self.train_acc = MulticlassAccuracy(n, average="micro")
        # not a registered child: the state dict holds the model once, under "model."
        object.__setattr__(self, "_forward", torch.compile(model) if recipe.train.compile else model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x)

    def setup(self, stage: str) -> None:
        if self.recipe.train.channels_last:
            self.model.to(memory_format=torch.channels_last)

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
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(y))
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss_fn(logits, y), on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(y))
        self.val_metrics.update(logits, y)
        self.log_dict(self.val_metrics, on_epoch=True, prog_bar=True, batch_size=len(y))

    def configure_optimizers(self) -> dict:
        o = self.recipe.optim
        groups = self.plan.param_groups(self.model, o.lr, o.weight_decay)
        for g in groups:
            g["lr"] = o.lr  # the scheduler's per-group factor carries the plan's multiplier
        if o.name == "adamw":
            opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)
        steps = max(1, math.ceil(self.trainer.estimated_stepping_batches / max(1, self.trainer.max_epochs)))
        sched = scheduler(opt, self.plan, steps, self.trainer.max_epochs, o.warmup_epochs, o.schedule, o.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["finetune"] = {"recipe": self.recipe.to_dict(), "classes": self.classes,
                                  "plan": self.plan.state_dict(), **self.extra}
