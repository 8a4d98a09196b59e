"""``optim.lr: find``: Lightning's learning-rate finder (``Tuner.lr_find``) on the freeze plan's param groups.

The finder sweeps one rate; each group steps at that rate times the plan's multiplier (fixed groups at 0), so
the rate found is the head's and the backbone keeps its share. The rate chosen is a tenth of the one at the
lowest loss (fastai's "minimum" rule; Lightning's steepest-gradient suggestion picked 2e-5 on hymenoptera, on the
flat start of a short, noisy curve: docs/benchmarks-accuracy.md). The curve goes to ``RUN/lr_find.png``, the rate and why
to ``lr_find.json``, ``plan.txt`` and the log; a resumed run reads the rate back instead of searching again.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

log = logging.getLogger("finetune")
MIN_LR, MAX_LR, STEPS = 1e-6, 1.0, 100


class KeepMultipliers(pl.Callback):
    """Scales every group's rate by the plan's multiplier before each step (the finder sets them all equal)."""

    def __init__(self, mults: list[float]):
        self.mults = mults

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        for group, mult in zip(optimizer.param_groups, self.mults):
            group["lr"] *= mult


def resolve(run, module: pl.LightningModule, datamodule, accelerator: str = "auto") -> float:
    """The head's rate for a recipe with ``optim.lr: find``: read back from the run, or searched now; it is set in
    the module's recipe, whose optimizer uses it."""
    from .module import FreezeSchedule
    from pytorch_lightning.tuner import Tuner
    path = Path(run.path) / "lr_find.json"
    if path.is_file():
        found = json.loads(path.read_text())
    else:
        plan = module.plan
        module.recipe.optim.lr = MIN_LR  # configure_optimizers needs a number; the finder sets the rates itself
        trainer = pl.Trainer(max_epochs=10_000, accelerator=accelerator, devices=1, logger=False,
                             callbacks=[FreezeSchedule(plan), KeepMultipliers(plan.lr_mults(0))],
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=run.path)
        finder = Tuner(trainer).lr_find(module, datamodule=datamodule, min_lr=MIN_LR, max_lr=MAX_LR,
                                        num_training=STEPS, update_attr=False)
        lrs, losses = np.array(finder.results["lr"]), np.array(finder.results["loss"], dtype=float)
        steps, steepest = len(lrs), finder.suggestion()
        if np.isfinite(losses).sum() < 10:
            lr, why = 1e-3, f"too few steps ({steps}) to read the curve: the default 0.001 is used"
        else:
            low = lrs[int(np.nanargmin(np.where(np.isfinite(losses), losses, np.nan)))]
            lr = low / 10
            why = (f"a tenth of {low:.3g}, where the smoothed training loss was lowest while the rate rose from "
                   f"{MIN_LR:g} to {MAX_LR:g} over {steps} steps (Lightning's lr finder; its steepest-fall "
                   f"suggestion was {steepest or float('nan'):.3g}: on these short, noisy curves it falls on the "
                   f"flat start); the curve is lr_find.png")
        fig = finder.plot(suggest=False)
        fig.axes[0].axvline(lr, color="#c44e52", ls="--", label=f"chosen: {lr:.3g}")
        fig.axes[0].legend()
        fig.savefig(Path(run.path) / "lr_find.png", dpi=100)
        found = {"lr": float(lr), "reason": f"learning rate {lr:.3g} for the head, the plan's multipliers give the "
                                            f"other groups their share: {why}", "steps": steps}
        path.write_text(json.dumps(found, indent=2))
        with open(Path(run.path) / "plan.txt", "a") as f:
            f.write(f"\n- {found['reason']}\n")
    log.info(found["reason"])
    module.recipe.optim.lr = found["lr"]
    return found["lr"]


class _StopBeforeTraining(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


def find_only(data, recipe=None, *, csv=None, out="runs", overrides: list[str] | None = None):
    """``finetune lr-find``: a run folder with the finder's curve and rate, and no training; returns it with
    the rate and its reason."""
    from .train import fit
    run = fit(data, recipe, csv=csv, out=out, overrides=[*(overrides or []), "optim.lr=find"], progress=False,
              callbacks=[_StopBeforeTraining()])
    return run, json.loads((run.path / "lr_find.json").read_text())
