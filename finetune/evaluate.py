"""``evaluate``: a trained run on labelled images: errors, per-class scores, confusion matrix, calibration, the most
confidently wrong images and the training curves, in a new ``RUN/eval-<data>-<split>/`` with an HTML report."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics.classification import (MulticlassAccuracy, MulticlassCalibrationError, MulticlassConfusionMatrix,
                                         MulticlassF1Score, MulticlassPrecision, MulticlassRecall)

from . import multilabel, plots
from .data import bad_files_note, scan
from .images import read_image
from .predict import Predictor
from .report import PICTURES, Evaluation, write_report
from .run import Run, next_free

__all__ = ["Evaluation", "evaluate", "select_items", "score", "PICTURES"]


def evaluate(run: str | Path | Run, data: str | Path | None = None, *, csv: str | Path | None = None,
             split: str | None = None, checkpoint: str = "final", batch_size: int = 64, workers: int | None = None,
             tta: bool = False, n_bins: int = 10, n_wrong: int = 16, device: str | None = None,
             report: bool = True) -> Evaluation:
    """Evaluate a run's checkpoint on ``data`` or ``csv`` (default: the run's own items) into a new
    ``RUN/eval-<data>-<split>`` folder; unreadable files and training images evaluated are noted in ``warnings``."""
    run = run if isinstance(run, Run) else Run.open(run)
    classes = run.classes
    items, name, split, bad = select_items(run, data, csv=csv, split=split)
    ckpt = run.checkpoint(checkpoint)
    predictor = Predictor.load(ckpt, device=device)
    if predictor.classes != classes:
        raise ValueError(f"{ckpt} predicts {predictor.classes}, the run's classes.json says {classes}")
    probs, errors = predictor.probabilities(items["path"].tolist(), tta=tta, batch_size=batch_size, workers=workers)
    if errors:
        bad = pd.concat([bad, pd.DataFrame({"path": items["path"][list(errors)], "reason": list(errors.values())})])
        keep = ~items.index.isin(list(errors))
        items, probs = items[keep].reset_index(drop=True), probs[torch.from_numpy(keep)]
    if not len(items):
        raise ValueError(f"none of the images of {name} ({split}) could be read")
    ckpt_name, folder = str(ckpt.relative_to(run.path)), next_free(run.path, f"eval-{name}-{split}")
    record = {"run": str(run.path), "data": name, "data_path": str(data or csv or run.path / "items.csv"),
              "split": split, "checkpoint": ckpt_name}
    train = run.training_items(ckpt)  # after a refit: train + val
    if predictor.thresholds is not None:
        return _evaluate_multilabel(run, predictor, items, probs, bad, train, folder, record, n_wrong, report)
    target = torch.tensor([classes.index(c) for c in items["label"]])
    metrics, table, cm = score(probs, target, classes, n_bins=n_bins)
    table.insert(1, "n_train", [int((train["label"] == c).sum()) for c in classes])
    notes = _warnings(metrics, items, train, bad, folder)
    pred = probs.argmax(-1)
    conf = probs.max(-1).values
    predictions = pd.DataFrame({"path": items["path"].to_numpy(), "label": items["label"].to_numpy(),
                                "predicted": [classes[i] for i in pred], "confidence": conf.numpy().round(6),
                                "correct": (pred == target).numpy()})
    for j, c in enumerate(classes):
        predictions[f"p_{c}"] = probs[:, j].numpy().round(6)
    cm_table = pd.DataFrame(cm, index=pd.Index(classes, name="true \\ predicted"), columns=classes)
    cm_table.to_csv(folder / "confusion.csv")
    record |= {"tta": tta, "classes": classes, "metrics": metrics, "warnings": notes, "confusion": cm.tolist()}
    wrong = predictions[~predictions["correct"]].sort_values("confidence", ascending=False, kind="stable")
    wrong = wrong.head(n_wrong)
    images = _as_read(predictor.preprocess, wrong["path"])
    titles = [f"true: {t}\npredicted: {p} ({c:.2f})\n{_short(Path(f).name)}"
              for t, p, c, f in zip(wrong["label"], wrong["predicted"], wrong["confidence"], wrong["path"])]
    n_wrong_all = int((~predictions["correct"]).sum())
    figures = {
        "per_class.png": plots.per_class(table),
        "confusion.png": plots.confusion(cm, classes),
        "calibration.png": plots.reliability(conf.numpy(), (pred == target).numpy(), n_bins, metrics["ece"]),
        "wrong.png": plots.image_grid(images, titles, title=f"Most confidently wrong: {len(images)} of the "
                                      f"{n_wrong_all} mistakes on {len(items)} images ({name}, {split})",
                                      empty=f"no mistakes on the {len(items)} images"),
        "curves.png": plots.curves(plots.read_logs(run.path), [g.name for g in run.plan.groups]),
        "class_counts.png": plots.class_counts(run.items, classes),
    }
    return _write(run, folder, record, predictions, table, cm, figures, report)


def select_items(run: Run, data: str | Path | None = None, *, csv: str | Path | None = None,
                 split: str | None = None) -> tuple[pd.DataFrame, str, str, pd.DataFrame]:
    """The images to evaluate (path, label), a name for the data, the split used (default test, else val; with
    data, else 'all') and the files the scan skipped (path, reason); labels the run does not know are an error."""
    bad = pd.DataFrame(columns=["path", "reason"])
    if data is None and csv is None:
        items = run.items
        name = Path(os.path.commonpath(items["path"].tolist()) if len(items) else run.path).name
    else:
        channels = run.read_json("data.json")["preprocess"]["channels"]
        found = scan(data, csv=csv, channels=channels)
        items, bad = found.items, found.bad
        name = Path(str(data)).resolve().name if data is not None else Path(csv).stem
    present = [s for s in ("test", "val", "train") if (items["split"] == s).any()]
    if split is None:
        split = next((s for s in ("test", "val") if s in present), None)
        if split is None:
            if data is None and csv is None:
                raise ValueError(f"{run.path} has no val or test images to evaluate on; pass DATA (a labelled folder)")
            split = "all"
    if split != "all":
        if split not in present:
            raise ValueError(f"split {split!r} has no images here; the data has {', '.join(present) or 'no splits'} "
                             f"(or use --split all)")
        items = items[items["split"] == split]
    unknown = sorted({lab for s in multilabel.label_sets(items["label"]) for lab in s} - set(run.classes)) \
        if run.recipe.train.labels == "multi" else sorted(set(items["label"]) - set(run.classes))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not classes of {run.path} ({', '.join(run.classes)}): evaluate "
                         f"on data with the run's classes only")
    return items[["path", "label"]].reset_index(drop=True), re.sub(r"[^\w.-]+", "_", name) or "data", split, bad


def score(probs: torch.Tensor, target: torch.Tensor, classes: list[str],
          n_bins: int = 10) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """torchmetrics on probabilities (N, C) and true indices (N,): headline numbers, per-class table and confusion
    matrix (rows: true); a class without images is left out of the balanced accuracy."""
    c = len(classes)
    top1 = float(MulticlassAccuracy(c, top_k=1, average="micro")(probs, target))
    top5 = float(MulticlassAccuracy(c, top_k=5, average="micro")(probs, target)) if c > 5 else None
    cm = MulticlassConfusionMatrix(c)(probs, target).numpy()
    support = cm.sum(axis=1)
    table = pd.DataFrame({
        "class": classes, "support": support, "predicted": cm.sum(axis=0),
        "precision": MulticlassPrecision(c, average=None)(probs, target).numpy(),
        "recall": MulticlassRecall(c, average=None)(probs, target).numpy(),
        "f1": MulticlassF1Score(c, average=None)(probs, target).numpy(),
    })
    majority = int(support.argmax())
    metrics = {
        "n": int(len(target)), "top1_error": 1 - top1, "top5_error": None if top5 is None else 1 - top5,
        # mean recall over the classes present (sklearn's balanced accuracy); torchmetrics' macro recall also
        # averages in a 0 for a class that is absent but predicted
        "accuracy": top1, "balanced_accuracy": float(table.loc[support > 0, "recall"].mean()),
        "macro_f1": float(MulticlassF1Score(c, average="macro")(probs, target)),
        "ece": float(MulticlassCalibrationError(c, n_bins=n_bins, norm="l1")(probs, target)), "n_bins": n_bins,
        "mean_confidence": float(probs.max(-1).values.mean()),
        "majority_class": classes[majority], "majority_accuracy": float(support[majority] / max(1, support.sum())),
    }
    return metrics, table, cm


def _warnings(metrics: dict, items: pd.DataFrame, train: pd.DataFrame, bad: pd.DataFrame, folder: Path) -> list[str]:
    """Count the evaluated images that are in the run's training split and the skipped files (listed in
    ``bad_files.csv``) into ``metrics``; the console's and report's sentences about them."""
    real = os.path.realpath  # the same file under another name (a symlinked folder) counts
    metrics["train_overlap"] = int(items["path"].map(real).isin(set(train["path"].map(real))).sum())
    metrics["bad_files"] = len(bad)
    notes = []
    if len(bad):
        bad.to_csv(folder / "bad_files.csv", index=False)
        notes.append(bad_files_note(bad, folder / "bad_files.csv"))
    if metrics["train_overlap"]:
        notes.append(f"{metrics['train_overlap']} of the {len(items)} evaluated images are in the run's own training "
                     f"split: these scores overstate how it does on images it has not seen")
    return notes


def _evaluate_multilabel(run: Run, predictor: Predictor, items: pd.DataFrame, probs: torch.Tensor, bad: pd.DataFrame,
                         train: pd.DataFrame, folder: Path, record: dict, n_wrong: int, report: bool) -> Evaluation:
    """Multi-label scores at the checkpoint's thresholds: mAP, macro/micro F1, per-label AP/F1, precision-recall
    curves, F1 against threshold, co-occurrence, and the images whose predicted label sets miss most."""
    classes = run.classes
    target = torch.from_numpy(multilabel.matrix(items["label"], classes))
    metrics, table = multilabel.score(probs, target, classes, predictor.thresholds)
    table.insert(1, "n_train", multilabel.matrix(train["label"], classes).sum(0).astype(int))
    notes = _warnings(metrics, items, train, bad, folder)
    pred = multilabel.decide(probs, predictor.thresholds).numpy()
    error = (probs - target).abs().sum(1).numpy()  # how far the predicted probabilities are from the true set
    predictions = pd.DataFrame({"path": items["path"].to_numpy(), "labels": items["label"].to_numpy(),
                                "predicted": [";".join(c for c, on in zip(classes, r) if on) for r in pred],
                                "exact": (pred == target.numpy()).all(1), "error": error.round(4)})
    for j, c in enumerate(classes):
        predictions[f"prob_{c}"] = probs[:, j].numpy().round(6)
    record |= {"classes": classes, "multilabel": True, "thresholds": predictor.thresholds, "metrics": metrics,
               "warnings": notes, "confusion": []}
    worst = predictions.sort_values(["exact", "error"], ascending=[True, False], kind="stable").head(n_wrong)
    titles = [f"true: {t or '-'}\npredicted: {p or '-'}\n{_short(Path(f).name)}"
              for t, p, f in zip(worst["labels"], worst["predicted"], worst["path"])]
    figures = {
        "per_label.png": plots.per_label(table),
        "pr_curves.png": plots.pr_curves(multilabel.pr_curves(probs, target, classes), dict(zip(classes, table["ap"]))),
        "threshold_f1.png": plots.threshold_f1(multilabel.f1_sweep(probs, target, classes),
                                               dict(zip(classes, predictor.thresholds))),
        "cooccurrence.png": plots.cooccurrence(multilabel.matrix(run.items["label"], classes), classes),
        "wrong.png": plots.image_grid(_as_read(predictor.preprocess, worst["path"]), titles,
                                      title=f"Largest errors: wrong label sets first "
                                      f"({int((~predictions['exact']).sum())} of {len(items)}), then the probabilities "
                                      f"farthest from the true set ({record['data']}, {record['split']})"),
        "curves.png": plots.curves(plots.read_logs(run.path), [g.name for g in run.plan.groups]),
    }
    return _write(run, folder, record, predictions, table, np.zeros((0, 0)), figures, report)


def _as_read(pre, paths) -> list[np.ndarray]:
    """The images as the network reads them, before resizing (read and intensity-scaled)."""
    return [pre.intensity_fn()(read_image(p, pre.channels, max_pixels=pre.max_pixels)) for p in paths]


def _write(run: Run, folder: Path, record: dict, predictions: pd.DataFrame, table: pd.DataFrame, cm: np.ndarray,
           figures: dict, report: bool) -> Evaluation:
    """predictions.csv, per_class.csv, metrics.json and the pictures into ``folder``, and the report if asked."""
    predictions.to_csv(folder / "predictions.csv", index=False)
    table.to_csv(folder / "per_class.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps({**record, "created": time.strftime("%Y-%m-%d %H:%M:%S")},
                                                    indent=2))
    for fname, fig in figures.items():
        plots.save(fig, folder / fname)
    result = Evaluation(folder=folder, run=run.path, data=record["data"], split=record["split"],
                        checkpoint=record["checkpoint"], classes=record["classes"], metrics=record["metrics"],
                        per_class=table, confusion=cm, pictures={n: folder / n for n in figures},
                        warnings=record["warnings"])
    if report:
        write_report(run, result, out=folder / "report.html")
    return result


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[:n - 11] + "..." + name[-8:]
