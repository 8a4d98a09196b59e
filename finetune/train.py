"""``fit``: from an image folder (or CSV) and a recipe to a trained model in a new run folder."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from . import augment, autorecipe, cache, lr_find, multilabel, tracking
from .backbone import create_backbone
from .data import SCAN_MODES, DataError, is_packed, scan, split
from .datamodule import ImageDataModule
from .freeze import Plan, plan_for, set_trainable
from .images import dataset_percentiles
from .module import Classifier
from .preprocess import Pipeline, Preprocess
from .recipe import Recipe, RecipeError, Train
from .fileio import atomic_write
from .run import AtomicCheckpointIO, Run, RunError
from .startup import StartupTimer

log = logging.getLogger("finetune")
# Lightning's advertisement for its cloud logger, printed by every Trainer, is noise in a training log
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
_RUN_ENV = "FINETUNE_RUN"  # rank 0's run folder, inherited by the DDP processes it starts
REFIT_BELOW = 300  # train.refit: auto refits data with fewer labelled images a class (docs/benchmarks-accuracy.md)


def prepare(data: str | Path | None, recipe: Recipe, *, csv: str | Path | None = None, progress: bool = False,
            timer: StartupTimer | None = None) -> tuple[pd.DataFrame, list[str], Any]:
    """Scan and split the data: (items with split, classes, scan); packed data comes split, a PackedData its scan."""
    if is_packed(data):
        from .packed import PackedData
        packed = PackedData(str(data))
        packed.check(recipe)
        timer and timer.mark("index")
        return packed.items, packed.classes, packed
    t = recipe.train
    sc = scan(data, csv=csv, channels=augment.read_channels(recipe), strict=t.strict,
              allow_outside=t.allow_outside, max_bad_fraction=t.max_bad_fraction,
              max_pixels=recipe.image.max_pixels, decode=SCAN_MODES[t.scan], progress=progress)
    timer and timer.mark("scan")
    if t.labels == "single" and sc.multilabel:
        raise DataError(f"{csv}: its label cells hold label sets (';' or 0/1 columns) but train.labels is single; "
                        f"set train.labels: multi (or auto)")
    items = split(sc.items, t.val_fraction, seed=t.seed, groups=t.split_groups,
                  multilabel=t.labels == "multi" or sc.multilabel)
    timer and timer.mark("split")
    return items, list(sc.classes), sc


def labels_kind(recipe: Recipe, sc: Any) -> Recipe:
    """The recipe with ``train.labels: auto`` resolved from the data (multi when the CSV holds label sets)."""
    if recipe.train.labels != "auto":
        return recipe
    return recipe.override({"train.labels": "multi" if sc.multilabel else "single"})


def fit(data: str | Path | None = None, recipe: str | Path | Recipe | None = None, *, csv: str | Path | None = None,
        out: str | Path = "runs", name: str | None = None, overrides: dict | list | None = None,
        resume: str | Path | None = None, progress: bool = True, callbacks: Iterable[pl.Callback] = ()) -> Run:
    """Fine-tune a timm backbone on an image folder (a sub-folder a class) or a CSV of path,label[,split] into a new
    run folder under ``out``. ``recipe``: a Recipe, shipped name or YAML file; None or 'auto' picks one
    (:mod:`finetune.autorecipe`). ``resume=RUN`` continues a stopped run (``overrides`` may raise ``train.epochs``
    only); Ctrl-C or SIGTERM raise :class:`TrainingStopped`. ``train.refit``: a second fit on train + val."""
    started, timer = time.time(), StartupTimer()
    if resume is None:
        if data is None and csv is None:
            raise ValueError("fit() needs data (an image folder) or csv= (a CSV of path,label), or resume=RUN")
        recipe_obj, chosen = autorecipe.resolve(recipe, data, csv, overrides)
        stem = f"{Path(str(data or csv)).resolve().name.replace(' ', '_') or 'data'}-{recipe_obj.backbone.name}"
        name = name or _job_name(stem)
    shared = None if resume is not None or _is_rank_zero() else _rank_zero_run(out, name)
    if resume is not None or shared is not None:
        run = shared or Run.open(resume)
        if resume is not None and overrides:
            _extend(run, overrides)
        recipe_obj, items, classes, plan = run.recipe, run.items, run.classes, run.plan
        stored = run.read_json("data.json")
        pre, packed = Preprocess.from_dict(stored["preprocess"]), stored.get("packed")
        ckpt = None if shared else run.checkpoint("last")
    else:
        augment.check_transforms(recipe_obj, f"recipe '{recipe_obj.name}'")
        items, classes, sc = prepare(data, recipe_obj, csv=csv, progress=progress, timer=timer)
        recipe_obj = labels_kind(recipe_obj, sc)
        if len(classes) < 2 and not sc.multilabel:
            raise DataError(f"{data or csv}: found {len(classes)} class(es) ({', '.join(classes) or 'none'}); "
                            f"a classifier needs at least two: one sub-folder per class")
        ckpt = None
    pl.seed_everything(recipe_obj.train.seed, workers=True, verbose=False)  # the new head's init: seeded too
    model = recipe_model(recipe_obj, len(classes), pretrained=None if ckpt is None else False)  # resumed: ckpt's
    timer.mark("model")
    if resume is None and shared is None:
        pre = _preprocess(recipe_obj, model, items)
        packed = getattr(sc, "url", None)
        run = Run.create(out, name, stem)
        run.write_new("recipe.yaml", recipe_obj.to_yaml())
        run.write_json("classes.json", classes)
        items.to_csv(run.path / "items.csv", index=False)
        sc.save_report(run.path)
        plan = run_plan(model, recipe_obj, items, classes, chosen, data=data, csv=csv, multi=sc.multilabel)
        run.write_json("plan.json", plan.state_dict())
        run.write_new("plan.txt", plan.explain() + "\n")
        timer.mark("plan")
        run.write_json("data.json", {"preprocess": pre.to_dict(), "packed": packed,
                                     "weights_source": getattr(model, "finetune_source", None)})
    timer.run = run
    if resume is None or run.summary.get("epochs") != recipe_obj.train.epochs:  # else on to the refit
        trainer, best = _fit_once(run, run.path, recipe_obj, model, plan, items, classes, pre, packed, ckpt,
                                  progress, [timer, *callbacks])
        if trainer.global_rank == 0:
            _finish(run, trainer, best, started, resumed=resume is not None)
    if refit_wanted(recipe_obj, items, classes, _processes(recipe_obj.train))[0] and _is_rank_zero():
        _refit(run, recipe_obj, plan, items, classes, pre, packed, progress, callbacks)
    return run


def recipe_model(recipe: Recipe, n_classes: int, *, pretrained: bool | None = None,
                 weights: str | Path | None = None) -> torch.nn.Module:
    """The recipe's backbone with a new ``n_classes`` head (its pretrained weights unless told otherwise)."""
    b = recipe.backbone
    return create_backbone(b.name, n_classes, pretrained=b.pretrained if pretrained is None else pretrained,
                           weights=b.weights if pretrained is None else weights,
                           in_chans=augment.model_channels(recipe), drop_rate=b.drop_rate)


def run_plan(model: torch.nn.Module, recipe: Recipe, items: pd.DataFrame, classes: list[str], chosen: list[str] = (),
             *, data: str | Path | None = None, csv: str | Path | None = None, multi: bool = False) -> Plan:
    """:func:`~finetune.freeze.plan_for` this data; its reasons open with the recipe's and end with the refit's."""
    plan = plan_for(model, recipe, int((items["split"] == "train").sum()), len(classes), data=data, csv=csv,
                    per_class=multilabel.images_a_label(items, classes) if multi else None)
    refit = refit_wanted(recipe, items, classes, _processes(recipe.train))[1]
    plan.reasons = [*chosen, *plan.reasons, *([refit] if refit else [])]
    return plan


def refit_wanted(recipe: Recipe, items: pd.DataFrame, classes: list[str], processes: int = 1) -> tuple[bool, str]:
    """Whether a second fit on train + val makes the final model (``train.refit``), and why; ``auto``: single-label
    data under REFIT_BELOW labelled images a class, in one process (val images then do more as training data)."""
    t, n_val = recipe.train, int((items["split"] == "val").sum())
    n = int(items["split"].isin(["train", "val"]).sum())
    per_class = n / max(len(classes), 1)
    if t.refit is False or n_val == 0:
        return False, "" if t.refit is False else "no refit: there is no validation split to add to the training set"
    blocked = ("multi-label data (the per-label thresholds are chosen on the validation images)"
               if t.labels == "multi" else f"{processes} processes (refit runs in one)" if processes > 1 else None)
    if blocked:
        if t.refit is True:
            raise RecipeError(f"train.refit: true is not available for {blocked}; set train.refit: false")
        return False, f"no refit: {blocked}"
    if t.refit == "auto" and per_class >= REFIT_BELOW:
        return False, (f"no refit: {per_class:.0f} labelled images a class >= {REFIT_BELOW}; the validation split "
                       f"stays out of training (train.refit: true adds it)")
    reason = "train.refit: true" if t.refit is True else f"{per_class:.0f} labelled images a class < {REFIT_BELOW}"
    return True, (f"refit: after this plan's run chooses on the {n_val} validation images, a second run with the "
                  f"same plan and {t.epochs} epochs trains on all {n} labelled images (train + val) and gives the "
                  f"final model, its last epoch kept ({reason}); the validation scores stay the first run's, an "
                  f"honest estimate.")


def _fit_once(run: Run, root: Path, recipe: Recipe, model: torch.nn.Module, plan: Plan, items: pd.DataFrame,
              classes: list[str], pre: Preprocess, packed: str | None, ckpt: Path | None, progress: bool,
              callbacks: list) -> tuple[pl.Trainer, ModelCheckpoint | None]:
    """One Lightning fit into ``root`` (RUN, or RUN/refit); returns the trainer and best checkpoint (refit: None)."""
    t = recipe.train
    set_trainable(model, plan, None)  # before DDP wraps the model: it registers what may ever train
    pl.seed_everything(t.seed, workers=True, verbose=False)
    has_val = bool((items["split"] == "val").any())
    # the best epoch's weights (for evaluate/export/predict); the optimizer state that resuming needs is in last
    best = BestCheckpoint(dirpath=root / "checkpoints", filename="best-{epoch:02d}",
                          monitor=("val_map" if t.labels == "multi" else "val_acc") if has_val else None, mode="max",
                          save_top_k=1, save_weights_only=True) if root == run.path else None  # a refit keeps last
    # every epoch, whatever the score: a crash never costs more than the epoch in progress
    last = ModelCheckpoint(dirpath=root / "checkpoints", filename="last", save_top_k=1, monitor=None,
                           enable_version_counter=False)
    processes, strategy, precision = _processes(t), t.strategy, t.precision
    if strategy == "ddp" or (strategy == "auto" and processes > 1):  # find unused: groups fixed in some epochs
        from pytorch_lightning.strategies import DDPStrategy
        strategy = DDPStrategy(find_unused_parameters=plan.releases_later)
    if precision == "16-mixed" and not torch.cuda.is_available():
        log.warning("precision 16-mixed needs a GPU; using bf16-mixed on the CPU")
        precision = "bf16-mixed"
    steps = math.ceil(int((items["split"] == "train").sum()) / processes / t.batch_size)
    trainer = pl.Trainer(
        max_epochs=t.epochs, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=strategy, use_distributed_sampler=False,  # our data modules shard by rank
        precision=precision, deterministic=t.deterministic,
        callbacks=[c for c in (best, last) if c] + [LearningRateMonitor(logging_interval="epoch"),
                                                    tracking.LogRun(run.path), *callbacks],
        logger=tracking.loggers(t.loggers, root), plugins=[AtomicCheckpointIO()], default_root_dir=root,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=None if has_val else 0, log_every_n_steps=max(1, min(50, steps)))
    skipped = run.path / "skipped_during_training.csv"  # the loaders record files that fail to read
    if _is_rank_zero() and not skipped.exists():
        skipped.write_text("path,reason\n")
    data_cls = ImageDataModule
    if packed is not None:  # its URL: the data source's only seam
        from .packed import PackedDataModule
        data_cls = functools.partial(PackedDataModule, packed)
    train_tf = Pipeline(augment.build_transforms(recipe, pre.config, train=True))
    dm = data_cls(items, {c: i for i, c in enumerate(classes)}, read_channels=pre.channels,
                  train_transform=train_tf, eval_transform=pre.eval_transform(), intensity=pre.intensity_fn(),
                  batch_size=t.batch_size, num_workers=t.num_workers, seed=t.seed, balance=recipe.loss.balance,
                  max_pixels=pre.max_pixels, skipped=skipped, multi=t.labels == "multi")
    weights = dm.class_weights() if recipe.loss.balance == "weights" else None
    module_cls = Classifier
    if cache.decide(recipe, plan, augment.pipeline_to_dict(train_tf.compose), pre.pipeline)[0]:
        _, info = cache.cached_training(model, plan, recipe, pre.to_dict(), items, dm, ckpt,
                                        trainer.strategy.root_device)  # dm now serves the cached features
        if _is_rank_zero():
            Run(root).write_json("features.json", info, replace=True)
        module_cls = cache.HeadClassifier
    module = module_cls(model, plan, recipe, classes, class_weights=weights, extra={"preprocess": pre.to_dict()})
    if recipe.optim.lr == "find":
        lr_find.resolve(run, module, dm, t.accelerator)
    with warnings.catch_warnings():
        for noise in (".*does not have many workers.*", ".*Checkpoint directory .* exists and is not empty.*",
                      ".*LeafSpec.*", ".*IterableDataset.*has `__len__` defined.*"):  # the last: litdata's, exact
            warnings.filterwarnings("ignore", message=noise)
        os.environ[_RUN_ENV] = str(run.path.resolve())  # for the processes Lightning's DDP launcher starts
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        except (KeyboardInterrupt, SystemExit):  # Lightning ends Ctrl-C with exit(1), SIGTERM with SIGTERMException
            raise TrainingStopped(f"stopped; continue with: finetune train --resume {run.path}") from None
        finally:
            os.environ.pop(_RUN_ENV, None)
    return trainer, best


def _refit(run: Run, recipe: Recipe, plan: Plan, items: pd.DataFrame, classes: list[str], pre: Preprocess,
           packed: str | None, progress: bool, callbacks: Iterable[pl.Callback]) -> None:
    """The second fit, on train + val, into RUN/refit (resumed from its last checkpoint); its last epoch is final."""
    started, root, summary = time.time(), run.path / "refit", run.summary
    done = summary.get("refit", {})
    if done.get("epochs") == recipe.train.epochs:
        return
    both = items.assign(split=items["split"].replace({"val": "train"}))
    n = int((both["split"] == "train").sum())
    log.info("refit on train + val (%d images), %d epochs", n, recipe.train.epochs)
    pl.seed_everything(recipe.train.seed, workers=True, verbose=False)
    model = recipe_model(recipe, len(classes))
    fresh = Plan.from_state_dict({**plan.state_dict(), "adapted": False})
    last = root / "checkpoints" / "last.ckpt"
    trainer, _ = _fit_once(run, root, recipe, model, fresh, both, classes, pre, packed,
                           last if last.is_file() else None, progress, list(callbacks))
    summary["refit"] = {"images": n, "epochs": trainer.current_epoch, "checkpoint": str(last.relative_to(run.path)),
                        "wall_time_s": round(done.get("wall_time_s", 0.0) + time.time() - started, 1)}
    summary["final_model"] = "refit"
    summary["validation_scores"] = ("the first fit's, on validation images it did not train on: the honest "
                                    "estimate; the final model (the refit) trained on those images too")
    run.write_json("summary.json", summary, replace=True)


def find_only(data, recipe=None, *, csv=None, out="runs", overrides: list[str] | None = None) -> tuple[Run, dict]:
    """``finetune lr-find``: a run folder with the finder's curve and rate, no training; returns it and lr_find.json."""
    run = fit(data, recipe, csv=csv, out=out, overrides=[*(overrides or []), "optim.lr=find", "train.refit=false"],
              progress=False, callbacks=[_StopBeforeTraining()])
    return run, json.loads((run.path / "lr_find.json").read_text())


class _StopBeforeTraining(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


class TrainingStopped(RunError):
    """Training was stopped (Ctrl-C, SIGTERM); the run folder holds the last finished epoch."""


class BestCheckpoint(ModelCheckpoint):
    """The best epoch by the monitored score; ties: the lower val loss, then the later epoch (not Lightning's first)."""

    best_loss = math.inf

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        loss = float(trainer.callback_metrics.get("val_loss", math.inf))
        tie = current is not None and bool(self.best_k_models) and bool(
            current == self.best_k_models[self.kth_best_model_path])
        better = loss <= self.best_loss if tie else super().check_monitor_top_k(trainer, current)
        if better:
            self.best_loss = loss
        return better

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_loss": self.best_loss}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.best_loss = state_dict.get("best_loss", math.inf)


def _extend(run: Run, overrides: dict | list) -> None:
    """Resume with more epochs: the only setting a resume may change (it is written to the run's recipe)."""
    recipe = run.recipe.override(overrides)
    if recipe.override({"train.epochs": run.recipe.train.epochs}).to_dict() != run.recipe.to_dict():
        raise RunError("a resumed run keeps its recipe; only --epochs (train.epochs) can change, to extend it")
    done = run.summary.get("epochs", 0)
    if recipe.train.epochs <= done:
        raise RunError(f"{run.path} has trained {done} epochs; --epochs must be more to extend it")
    if recipe.train.epochs != run.recipe.train.epochs:
        log.info("extending %s from %d to %d epochs", run.path, run.recipe.train.epochs, recipe.train.epochs)
        atomic_write(run.path / "recipe.yaml", recipe.to_yaml())


def _is_rank_zero() -> bool:
    """False in the other processes of a launch (torchrun: RANK, srun: SLURM_PROCID, Lightning: NODE/LOCAL_RANK)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if int(env.get("SLURM_NTASKS", 1)) > 1:
        return int(env.get("SLURM_PROCID", 0)) == 0
    return int(env.get("NODE_RANK", 0)) == 0 and int(env.get("LOCAL_RANK", 0)) == 0


def _job_name(stem: str) -> str | None:
    """A run folder name every process of one cluster job agrees on (SLURM job id, torchrun run id)."""
    env = os.environ
    if int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1))) < 2:
        return None
    job = env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID", "none")
    return None if job == "none" else f"{stem}-job{job}"


def _rank_zero_run(out: str | Path, name: str | None, timeout: float = 1800.0) -> Run:
    """Rank 0's run folder, once rank 0 has written it (data.json is its last file before training)."""
    path = os.environ.get(_RUN_ENV) or (Path(out) / name if name else None)
    if path is None:
        raise RunError("this is not rank 0 of a multi-process launch and cannot tell which run folder rank 0 "
                       "writes: pass the same --name to every process")
    deadline = time.time() + timeout
    while not (Path(path) / "data.json").is_file():
        if time.time() > deadline:
            raise RunError(f"rank 0 did not write {path} within {timeout:.0f} s")
        time.sleep(0.5)
    return Run.open(path)


def _preprocess(recipe: Recipe, model: torch.nn.Module, items: pd.DataFrame) -> Preprocess:
    im, channels, config = recipe.image, augment.read_channels(recipe), augment.data_config(recipe, model)
    stats = None if im.intensity != "dataset" else dataset_percentiles(
        items.loc[items["split"] == "train", "path"], channels, im.percentiles, max_pixels=im.max_pixels)
    return Preprocess(channels=channels, intensity=im.intensity, percentiles=im.percentiles,
                      stats=stats, max_pixels=im.max_pixels, config=json.loads(json.dumps(config)),
                      pipeline=augment.pipeline_to_dict(augment.build_transforms(recipe, config, train=False)))


def _processes(t: Train) -> int:
    """How many training processes the settings ask for (devices per node times nodes)."""
    d = str(t.devices)
    if d in ("auto", "-1"):
        n = torch.cuda.device_count() if t.accelerator in ("auto", "gpu", "cuda") else 1
    else:
        n = len([x for x in d.strip("[]").split(",") if x.strip()]) if "," in d else int(d)
    return max(1, n) * t.num_nodes


def _finish(run: Run, trainer: pl.Trainer, best: ModelCheckpoint, started: float, resumed: bool) -> None:
    """Write the epoch table and the summary (replaced on resume: it describes the run as it now stands)."""
    table = run.metrics()
    if not table.empty:
        atomic_write(run.path / "metrics.csv", table.to_csv(index=False))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith(("val_", "train_")) and not k.endswith(("_step", "_epoch"))}
    best_path = Path(best.best_model_path) if best.best_model_path else run.path / "checkpoints" / "last.ckpt"
    best_path = best_path.resolve().relative_to(run.path.resolve())  # Lightning's paths are absolute, --out may not be
    previous = run.summary
    skipped = pd.read_csv(run.path / "skipped_during_training.csv")["path"].nunique()
    if skipped:
        log.warning("%d files failed to read during training and were left out: %s", skipped,
                    run.path / "skipped_during_training.csv")
    run.write_json("summary.json", {
        "run": str(run.path), "epochs": trainer.current_epoch, "best_checkpoint": str(best_path),
        "best_score": float(best.best_model_score) if best.best_model_score is not None else None,
        "best_metric": best.monitor, "final_metrics": metrics,
        "wall_time_s": round(previous.get("wall_time_s", 0.0) + time.time() - started, 1),
        "attempts": previous.get("attempts", 0) + 1, "resumed": resumed, "skipped_during_training": int(skipped),
        "backbone": run.recipe.backbone.name, "classes": run.classes,
        "versions": {"torch": torch.__version__, "pytorch_lightning": pl.__version__},
    }, replace=True)
