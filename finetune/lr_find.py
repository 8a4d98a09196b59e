"""``optim.lr: find``: Lightning's ``Tuner.lr_find`` on the plan's param groups (each at the swept rate times its
multiplier, so the rate is the head's); a tenth of the rate at the lowest loss (fastai's rule; Lightning's suggestion
misread short curves: docs/benchmarks-accuracy.md), recorded in ``RUN/lr_find.*`` and read back on resume."""
from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytorch_lightning as pl

log = logging.getLogger("finetune")
MIN_LR, MAX_LR, STEPS = 1e-6, 1.0, 100


class KeepMultipliers(pl.Callback):
    """Scales the one rate the finder sweeps by each group's multiplier (0 while its stage is fixed) before a step."""

    def __init__(self, plan):
        self.plan = plan

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] *= group["lr_scale"] * self.plan.groups[group["stage"]].live_at(0)


def resolve(run, module: pl.LightningModule, datamodule, accelerator: str = "auto") -> float:
    """The head's rate for a recipe with ``optim.lr: find``: read back from the run, or searched now; it is set in
    the module's recipe, whose optimizer uses it."""
    from pytorch_lightning.tuner import Tuner
    if (run.path / "lr_find.json").is_file():
        found = run.read_json("lr_find.json")
    elif int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))) > 1:
        raise ValueError("optim.lr: find searches in one process, not in a multi-process launch: run 'finetune "
                         "lr-find DATA' first, then train with --lr RATE")
    else:
        plan, adapted = module.plan, module.plan.adapted
        module.recipe.optim.lr = MIN_LR  # configure_optimizers needs a number; the finder sets the rates itself
        trainer = pl.Trainer(max_epochs=10_000, accelerator=accelerator, devices=1, logger=False,
                             callbacks=[KeepMultipliers(plan)], use_distributed_sampler=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=run.path)
        finder = Tuner(trainer).lr_find(module, datamodule=datamodule, min_lr=MIN_LR, max_lr=MAX_LR,
                                        num_training=STEPS, update_attr=False)
        plan.adapted = adapted  # the finder restored the weights, BN statistics included: training adapts again
        curve = pd.DataFrame(finder.results)  # lr, smoothed loss per step
        curve.to_csv(run.path / "lr_find.csv", index=False)
        lr, why = choose(curve["lr"].to_numpy(), curve["loss"].to_numpy(), finder.suggestion())
        fig = finder.plot(suggest=False)
        fig.axes[0].axvline(lr, color="#c44e52", ls="--", label=f"chosen: {lr:.3g}")
        fig.axes[0].legend()
        fig.savefig(run.path / "lr_find.png", dpi=100)
        found = {"lr": float(lr), "reason": f"learning rate {lr:.3g} for the head, the plan's multipliers give the "
                                            f"other groups their share: {why}", "steps": len(curve)}
        run.write_json("lr_find.json", found)
        with open(run.path / "plan.txt", "a") as f:
            f.write(f"\n- {found['reason']}\n")
    log.info(found["reason"])
    module.recipe.optim.lr = found["lr"]
    return found["lr"]


def choose(lrs: np.ndarray, losses: np.ndarray, steepest: float | None = None, skip: int = 10) -> tuple[float, str]:
    """A tenth of the rate at the lowest smoothed loss, the first ``skip`` steps left out (as Lightning's own
    suggestion does: the smoothing starts from one batch's loss), and the reason in words."""
    tail = np.where(np.isfinite(losses[skip:]), losses[skip:], np.nan)
    if np.isfinite(tail).sum() < 5:
        return 1e-3, f"too few steps ({len(lrs)}) to read the curve: the default 0.001 is used"
    low = float(lrs[skip + int(np.nanargmin(tail))])
    return low / 10, (f"a tenth of {low:.3g}, where the smoothed training loss was lowest while the rate rose from "
                      f"{lrs[0]:.2g} to {lrs[-1]:.2g} over {len(lrs)} steps (Lightning's lr finder; its "
                      f"steepest-fall suggestion was {steepest or float('nan'):.3g}); the curve is lr_find.png")
