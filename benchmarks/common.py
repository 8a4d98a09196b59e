"""Shared helpers for the accuracy benchmarks: seeded subset CSVs, one fit, appending result rows.

Every benchmark writes one CSV row per finished training (appended at once, so partial results survive a crash)
and skips rows whose key is already in the CSV, so a rerun only does what is missing.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the shared data sets sit next to the repository (../shared/datasets); FINETUNE_DATASETS points elsewhere
DATASETS = Path(os.environ.get("FINETUNE_DATASETS", ROOT.parent / "shared" / "datasets"))
RESULTS = ROOT / "benchmarks" / "results"
RUNS = Path(os.environ.get("FINETUNE_BENCH_RUNS", "/tmp/finetune_bench_runs"))
MITOCHECK_GROUPS = r"^(PLLT\d+_\d+)"
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def shown(path: str | Path) -> str:
    """``path`` as a command run from the repository root would write it (``../shared/datasets/...``)."""
    return os.path.relpath(path, ROOT)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def set_threads(n: int = 1) -> None:
    """Intra-op threads. 1, not 2: on this 2-core machine shared with other jobs (load average ~10), a training step
    of tf_efficientnet_lite0 (batch 32, 112 px) took 4.0 s with 1 thread and 14-18 s with 2 (threads stall each
    other when the cores are oversubscribed)."""
    import torch
    torch.set_num_threads(n)


# -- data ------------------------------------------------------------------------------------------------------
def list_images(dataset: str) -> pd.DataFrame:
    """path (relative to the dataset folder), label, split ('' when the dataset has no split) of every image."""
    root = DATASETS / dataset
    rows = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXT or p.name.startswith("."):
            continue
        rel = p.relative_to(root).parts
        if rel[0] in ("train", "val", "test"):
            rows.append((str(p.relative_to(root)), rel[1], rel[0]))
        else:
            rows.append((str(p.relative_to(root)), rel[0], ""))
    return pd.DataFrame(rows, columns=["path", "label", "split"])


def _stratified_cap(df: pd.DataFrame, cap: int | None, seed: int) -> pd.DataFrame:
    """A seeded subset of at most ``cap`` rows keeping class proportions (each class keeps at least one)."""
    if cap is None or len(df) <= cap:
        return df
    n = df["label"].value_counts()
    want = np.maximum(1, np.floor(n / n.sum() * cap)).astype(int)
    extra = cap - int(want.sum())  # hand out the rounding remainder to the largest classes
    for c in n.sort_values(ascending=False).index[:max(0, extra)]:
        want[c] += 1
    parts = [g.sample(n=min(len(g), int(want[c])), random_state=seed) for c, g in df.groupby("label", sort=True)]
    return pd.concat(parts).sort_values("path")


def base_split(dataset: str, seed: int = 0) -> pd.DataFrame:
    """Train/val assignment of every image: the dataset's own split, or (mitocheck) a plate/well-grouped hold-out
    of ~20% made with the package's own grouped splitter. The test split is dropped."""
    df = list_images(dataset)
    df = df[df["split"] != "test"]
    if (df["split"] == "").all():
        from finetune.data import split
        df = split(df.assign(split=""), 0.2, seed=seed, groups=MITOCHECK_GROUPS)
    return df.reset_index(drop=True)


def subset_csv(dataset: str, per_class: int | None, *, val_cap: int | None = 300, seed: int = 0,
               out: Path | None = None, val_seed: int = 0) -> tuple[Path, dict]:
    """Write a CSV (path,label,split; paths relative to the dataset folder) with ``per_class`` seeded training
    images a class (all of a smaller class; None: every training image) and a fixed stratified validation subset
    of at most ``val_cap`` images. The validation subset depends only on (dataset, val_cap, val_seed), so it is
    identical across training sizes, seeds and plans. Returns the path and counts."""
    df = base_split(dataset, val_seed)
    val = _stratified_cap(df[df["split"] == "val"], val_cap, val_seed)
    train = df[df["split"] == "train"]
    if per_class is not None:
        train = pd.concat([g.sample(n=min(len(g), per_class), random_state=seed)
                           for _, g in train.groupby("label", sort=True)])
    sub = pd.concat([train.assign(split="train"), val.assign(split="val")]).sort_values(["split", "path"])
    out = out or RESULTS / "subsets" / f"{dataset}-{per_class or 'all'}-val{val_cap or 'all'}-s{seed}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = sub[["path", "label", "split"]].to_csv(index=False)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)
    if dataset == "mitocheck_cells":  # no plate/well on both sides of the split
        g = lambda s: set(s.str.extract(r"(PLLT\d+_\d+)")[0])  # noqa: E731
        assert not (g(train["path"].map(lambda p: Path(p).name)) & g(val["path"].map(lambda p: Path(p).name)))
    info = {"n_train": len(train), "n_val": len(val), "n_classes": df["label"].nunique(),
            "train_counts": train["label"].value_counts().sort_index().to_dict(),
            "val_counts": val["label"].value_counts().sort_index().to_dict()}
    return out, info


# -- one fit ---------------------------------------------------------------------------------------------------
def plan_key(state: dict) -> str:
    """A short hash of what a plan does (per group: when it trains, lr multiplier, BN mode; the schedule)."""
    what = {"schedule": state["schedule"],
            "groups": [(g["name"], g["train_from"], round(float(g["lr_mult"]), 6), g["bn"]) for g in state["groups"]]}
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]


def plan_summary(state: dict) -> dict:
    from finetune.freeze import Plan
    p = Plan.from_state_dict(state)
    return {"fixed_depth": p.fixed_depth, "schedule": p.schedule, "plan_hash": plan_key(state),
            "distance": state.get("inputs", {}).get("distance", "")}


_PREDICT_CACHE: dict = {}


def predict_plan(dataset: str, csv_path: Path, recipe: str, overrides: list[str]) -> dict:
    """The plan ``fit`` would make for these settings, without training (to key rows by the plan itself).

    The scanned items and the model are cached per (dataset, CSV, recipe, non-freeze overrides): making a plan
    reads the model's structure only."""
    from finetune import augment
    from finetune.backbone import create_backbone
    from finetune.freeze import plan_for
    from finetune.recipe import load_recipe
    from finetune import train as T
    r = load_recipe(recipe).override(overrides)
    key = (dataset, str(csv_path), recipe, tuple(o for o in overrides if not o.startswith("freeze.")))
    if key not in _PREDICT_CACHE:
        _PREDICT_CACHE.clear()
        items, classes, _ = T.prepare(DATASETS / dataset, r, csv=csv_path)
        b = r.backbone
        model = create_backbone(b.name, len(classes), pretrained=b.pretrained, weights=b.weights,
                                in_chans=augment.model_channels(r), drop_rate=b.drop_rate)
        _PREDICT_CACHE[key] = items, classes, model
    items, classes, model = _PREDICT_CACHE[key]
    plan = plan_for(model, r, int((items["split"] == "train").sum()), len(classes), data=DATASETS / dataset, csv=csv_path)
    return plan_summary(plan.state_dict())


class _ValidateAtEnd:
    """Within the block, Lightning validates only after the last epoch (``check_val_every_n_epoch=max_epochs``).

    Benchmark-only cost saving: the reported metric is the final epoch's validation score either way (fit's
    summary takes ``trainer.callback_metrics``), so validating every epoch only spends CPU. Nothing in the
    training depends on validation (cosine schedule, freeze schedule by epoch)."""

    def __enter__(self):
        import pytorch_lightning as pl
        self.pl, self.orig = pl, pl.Trainer
        orig = self.orig

        class Trainer(orig):
            def __init__(self, *a, **k):
                if "check_val_every_n_epoch" not in k and k.get("max_epochs"):
                    k["check_val_every_n_epoch"] = int(k["max_epochs"])
                super().__init__(*a, **k)

        pl.Trainer = Trainer
        return self

    def __exit__(self, *exc):
        self.pl.Trainer = self.orig


def run_fit(dataset: str, csv_path: Path, recipe: str, overrides: list[str], name: str,
            validate_every_epoch: bool = False) -> dict:
    """Train once; returns the metrics, plan and wall time as a flat dict."""
    import contextlib
    from finetune.train import fit
    RUNS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with contextlib.nullcontext() if validate_every_epoch else _ValidateAtEnd():
        run = fit(DATASETS / dataset, recipe, csv=csv_path, out=RUNS,  # scored on validation: no refit
                  name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", overrides=["train.refit=false", *overrides],
                  progress=False)
    wall = time.time() - t0
    s = run.summary
    want = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.epochs=")), None)
    if want is not None and s.get("epochs") != want:  # e.g. stopped early by a SIGTERM: not a result
        raise RuntimeError(f"{s['run']}: trained {s.get('epochs')} of {want} epochs; no row written")
    m = s["final_metrics"]
    state = json.loads((Path(s["run"]) / "plan.json").read_text())
    return {"val_acc": round(m.get("val_acc", float("nan")), 4), "val_recall": round(m.get("val_recall", float("nan")), 4),
            "best_val_acc": round(s["best_score"], 4) if s.get("best_score") is not None else "",
            "wall_s": round(wall, 1), "run": s["run"], **plan_summary(state)}


# -- result rows -----------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict, columns: list[str]) -> None:
    """Append one row (writing the header first if the file is new); extra keys are dropped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)
