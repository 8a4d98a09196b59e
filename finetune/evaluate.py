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
from matplotlib.figure import Figure
from torchmetrics.classification import (MulticlassAccuracy, MulticlassCalibrationError, MulticlassConfusionMatrix,
                                         MulticlassF1Score, MulticlassPrecision, MulticlassRecall)

from . import multilabel, plots
from .data import bad_files_note, scan
from .predict import Predictor
from .preprocess import Preprocess
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
    folder = next_free(run.path, f"eval-{name}-{split}")
    train = run.training_items(ckpt)  # after a refit: train + val
    if predictor.thresholds is None:
        kind, scored = {"tta": tta, "classes": classes}, _single_label
    else:
        kind, scored = {"classes": classes, "multilabel": True, "thresholds": predictor.thresholds}, _multilabel
    metrics, table, cm, predictions, figures = scored(run, predictor, items, probs, train, n_bins, n_wrong,
                                                      f"{name}, {split}")
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
    record = {"run": str(run.path), "data": name, "data_path": str(data or csv or run.path / "items.csv"),
              "split": split, "checkpoint": str(ckpt.relative_to(run.path)), **kind, "metrics": metrics,
              "warnings": notes, "confusion": cm.tolist(), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (folder / "metrics.json").write_text(json.dumps(record, indent=2))
    predictions.to_csv(folder / "predictions.csv", index=False)
    table.to_csv(folder / "per_class.csv", index=False)
    if predictor.thresholds is None:
        pd.DataFrame(cm, index=pd.Index(classes, name="true \\ predicted"), columns=classes).to_csv(
            folder / "confusion.csv")
    figures["curves.png"] = plots.curves(plots.read_logs(run.path), [g.name for g in run.plan.groups])
    for fname, fig in figures.items():
        plots.save(fig, folder / fname)
    result = Evaluation(folder=folder, run=run.path, data=name, split=split, checkpoint=record["checkpoint"],
                        classes=classes, metrics=metrics, per_class=table, confusion=cm,
                        pictures={n: folder / n for n in figures}, warnings=notes)
    if report:
        write_report(run, result, out=folder / "report.html")
    return result


def select_items(run: Run, data: str | Path | None = None, *, csv: str | Path | None = None,
                 split: str | None = None) -> tuple[pd.DataFrame, str, str, pd.DataFrame]:
    """The images to evaluate (path, label), a name for the data, the split used (default test, else val; with
    data, else 'all') and the files the scan skipped (path, reason); labels the run does not know are an error."""
    own = data is None and csv is None
    if own:
        items, bad = run.items, pd.DataFrame(columns=["path", "reason"])
        name = Path(os.path.commonpath(items["path"].tolist()) if len(items) else run.path).name
    else:
        found = scan(data, csv=csv, channels=run.read_json("data.json")["preprocess"]["channels"])
        items, bad = found.items, found.bad
        name = Path(str(data)).resolve().name if data is not None else Path(csv).stem
    present = [s for s in ("test", "val", "train") if (items["split"] == s).any()]
    if split is None:
        split = next((s for s in ("test", "val") if s in present), "all")
        if split == "all" and own:
            raise ValueError(f"{run.path} has no val or test images to evaluate on; pass DATA (a labelled folder)")
    if split != "all":
        if split not in present:
            raise ValueError(f"split {split!r} has no images here; the data has {', '.join(present) or 'no splits'} "
                             f"(or use --split all)")
        items = items[items["split"] == split]
    labels = multilabel.classes_of(items["label"]) if run.recipe.train.labels == "multi" else items["label"]
    unknown = sorted(set(labels) - set(run.classes))
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
    top5_error = 1 - float(MulticlassAccuracy(c, top_k=5, average="micro")(probs, target)) if c > 5 else None
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
        "n": int(len(target)), "top1_error": 1 - top1, "top5_error": top5_error,
        # mean recall of the classes present (sklearn's); torchmetrics' macro recall adds 0 for absent, predicted ones
        "accuracy": top1, "balanced_accuracy": float(table.loc[support > 0, "recall"].mean()),
        "macro_f1": float(MulticlassF1Score(c, average="macro")(probs, target)),
        "ece": float(MulticlassCalibrationError(c, n_bins=n_bins, norm="l1")(probs, target)), "n_bins": n_bins,
        "mean_confidence": float(probs.max(-1).values.mean()),
        "majority_class": classes[majority], "majority_accuracy": float(support[majority] / max(1, support.sum())),
    }
    return metrics, table, cm


def _single_label(run: Run, predictor: Predictor, items: pd.DataFrame, probs: torch.Tensor, train: pd.DataFrame,
                  n_bins: int, n_wrong: int, where: str) -> tuple[dict, pd.DataFrame, np.ndarray, pd.DataFrame, dict]:
    """Metrics, per-class table, confusion matrix, predictions and pictures of a single-label evaluation."""
    classes = run.classes
    target = torch.tensor([classes.index(c) for c in items["label"]])
    metrics, table, cm = score(probs, target, classes, n_bins=n_bins)
    table.insert(1, "n_train", [int((train["label"] == c).sum()) for c in classes])
    conf, pred = probs.max(-1)
    correct = (pred == target).numpy()
    predictions = pd.DataFrame({"path": items["path"].to_numpy(), "label": items["label"].to_numpy(),
                                "predicted": [classes[i] for i in pred], "confidence": conf.numpy().round(6),
                                "correct": correct})
    predictions[[f"p_{c}" for c in classes]] = probs.numpy().round(6)
    wrong = predictions[~correct].sort_values("confidence", ascending=False, kind="stable").head(n_wrong)
    titles = [f"true: {t}\npredicted: {p} ({c:.2f})"
              for t, p, c in zip(wrong["label"], wrong["predicted"], wrong["confidence"])]
    figures = {
        "per_class.png": plots.per_class(table),
        "confusion.png": plots.confusion(cm, classes),
        "calibration.png": plots.reliability(conf.numpy(), correct, n_bins, metrics["ece"]),
        "wrong.png": _grid(predictor.preprocess, wrong, titles, title=f"Most confidently wrong: {len(wrong)} of the "
                           f"{int((~correct).sum())} mistakes on {len(items)} images ({where})",
                           empty=f"no mistakes on the {len(items)} images"),
        "class_counts.png": plots.class_counts(run.items, classes),
    }
    return metrics, table, cm, predictions, figures


def _multilabel(run: Run, predictor: Predictor, items: pd.DataFrame, probs: torch.Tensor, train: pd.DataFrame,
                n_bins: int, n_wrong: int, where: str) -> tuple[dict, pd.DataFrame, np.ndarray, pd.DataFrame, dict]:
    """The same for a multi-label run, at its thresholds: mAP, F1s, PR curves, co-occurrence, worst label sets."""
    classes = run.classes
    target = torch.from_numpy(multilabel.matrix(items["label"], classes))
    metrics, table = multilabel.score(probs, target, classes, predictor.thresholds)
    table.insert(1, "n_train", multilabel.matrix(train["label"], classes).sum(0).astype(int))
    pred = multilabel.decide(probs, predictor.thresholds).numpy()
    error = (probs - target).abs().sum(1).numpy()  # how far the predicted probabilities are from the true set
    predictions = pd.DataFrame({"path": items["path"].to_numpy(), "labels": items["label"].to_numpy(),
                                "predicted": [";".join(c for c, on in zip(classes, r) if on) for r in pred],
                                "exact": (pred == target.numpy()).all(1), "error": error.round(4)})
    predictions[[f"prob_{c}" for c in classes]] = probs.numpy().round(6)
    worst = predictions.sort_values(["exact", "error"], ascending=[True, False], kind="stable").head(n_wrong)
    titles = [f"true: {t or '-'}\npredicted: {p or '-'}" for t, p in zip(worst["labels"], worst["predicted"])]
    figures = {
        "per_label.png": plots.per_label(table),
        "pr_curves.png": plots.pr_curves(multilabel.pr_curves(probs, target, classes), dict(zip(classes, table["ap"]))),
        "threshold_f1.png": plots.threshold_f1(multilabel.f1_sweep(probs, target, classes),
                                               dict(zip(classes, predictor.thresholds))),
        "cooccurrence.png": plots.cooccurrence(multilabel.matrix(run.items["label"], classes), classes),
        "wrong.png": _grid(predictor.preprocess, worst, titles, title=f"Largest errors: wrong label sets first "
                           f"({int((~predictions['exact']).sum())} of {len(items)}), then the probabilities farthest "
                           f"from the true set ({where})"),
    }
    return metrics, table, np.zeros((0, 0)), predictions, figures


def _grid(pre: Preprocess, rows: pd.DataFrame, titles: list[str], **kw) -> Figure:
    """The images of ``rows`` as read and intensity-scaled (before resizing), under their titles and file names."""
    images = [pre.read(p) for p in rows["path"]]
    names = [n if len(n) <= 28 else n[:17] + "..." + n[-8:] for n in (Path(p).name for p in rows["path"])]
    return plots.image_grid(images, [f"{t}\n{n}" for t, n in zip(titles, names)], **kw)
