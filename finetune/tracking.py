"""Experiment tracking: the Lightning loggers ``train.loggers`` names (the CSV log is always written), and the
recipe, freeze plan and final metrics logged to each as parameters, metrics and files at the end of training."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from .extras import require


def loggers(names: list[str], run_path: Path) -> list[Logger]:
    """The CSV logger (``RUN/logs``, which the run's tables read) first, then the others asked for; a logger whose
    package is missing is an error naming the extra, raised before any training."""
    out: list[Logger] = [CSVLogger(run_path, name="logs")]
    for name in dict.fromkeys(n for n in names if n != "csv"):
        require(name, name, f"train.loggers: {name}")  # each logger's package and extra have its name
        if name == "tensorboard":
            out.append(TensorBoardLogger(run_path, name="tensorboard", default_hp_metric=False))
        elif name == "mlflow":  # MLflow's own variable wins; else a file store inside the run folder
            uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_path) / "mlruns").resolve().as_uri()
            if uri.startswith("file:"):  # MLflow 3 asks to opt in to its file store (no server, no database)
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            out.append(_MLflow(experiment_name="finetune", run_name=Path(run_path).name, tracking_uri=uri))
        else:
            out.append(WandbLogger(name=Path(run_path).name, project="finetune", save_dir=str(run_path)))
    return out


class _MLflow(MLFlowLogger):
    """Metric names with '.' for '/': a file store keeps 'lr-AdamW/stem' as a file, so 'lr-AdamW/stem/no_decay'
    (the stage's weights without decay) could not be a folder beside it."""

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({k.replace("/", "."): v for k, v in metrics.items()}, step)


class LogRun(pl.Callback):
    """At the end of training: the recipe (dotted keys) and plan as parameters, the final metrics, and the run's
    recipe.yaml, plan.txt and lr_find.png as files, to every logger but the CSV one (the run folder has them)."""

    def __init__(self, run_path: Path):
        self.path = Path(run_path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from .run import Run
        run = Run(self.path)
        flat = pd.json_normalize(run.recipe.to_dict(), sep=".").to_dict("records")[0]  # dotted keys
        params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
        for g in run.plan.groups:  # MLflow's keys take no '+', which joins module names in a group's name
            params[f"plan.{g.name.replace('+', ' ')}"] = (f"trains from {g.train_from}, lr x{g.lr_mult:.3g}, "
                                                         f"bn: {g.bn_text}")
        final = {f"final_{k}": float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith(("val_", "train_")) and not k.endswith(("_step", "_epoch"))}
        files = [self.path / n for n in ("recipe.yaml", "plan.txt", "lr_find.png") if (self.path / n).is_file()]
        for lg in [lg for lg in trainer.loggers if not isinstance(lg, CSVLogger)]:
            lg.log_hyperparams(params)
            lg.log_metrics(final, step=trainer.global_step)
            if isinstance(lg, MLFlowLogger):
                for f in files:
                    lg.experiment.log_artifact(lg.run_id, str(f))
            elif isinstance(lg, WandbLogger):
                for f in files:
                    lg.experiment.save(str(f), base_path=str(self.path), policy="now")
