"""``evaluate``: a trained run on labelled images: top-1/top-5 error, per-class precision/recall/F1, confusion
matrix, calibration, the most confidently wrong images and the training curves, in a new folder of the run
(``RUN/eval-<data>-<split>/``, numbered rather than overwritten) with an HTML report of it all.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics.classification import (MulticlassAccuracy, MulticlassCalibrationError, MulticlassConfusionMatrix,
                                         MulticlassF1Score, MulticlassPrecision, MulticlassRecall)

from . import plots
from .images import read_image
from .run import Run, next_free

__all__ = ["Evaluation", "evaluate", "select_items", "score", "PICTURES"]

#: file name -> what the picture shows (the report's captions use these too)
PICTURES = {
    "per_class.png": "Images per class (left) beside each class's precision, recall and F1 (right).",
    "confusion.png": "Confusion matrix: counts, coloured by the share of each true class (left: recall) and of "
                     "each predicted class (right: precision).",
    "calibration.png": "Reliability diagram: is the model as often right as it is confident?",
    "wrong.png": "The most confidently wrong images, with their true and predicted labels, shown after the run's "
                 "intensity scaling (as the network sees them, before resizing).",
    "curves.png": "Training curves: loss, accuracy and each param group's learning rate.",
    "class_counts.png": "Images per class in each split of the run's data.",
}


@dataclass
class Evaluation:
    """The result of :func:`evaluate`; ``load`` reads one back from its folder."""

    folder: Path
    run: Path
    data: str
    split: str
    checkpoint: str
    classes: list[str]
    metrics: dict
    per_class: pd.DataFrame
    confusion: np.ndarray
    pictures: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path) -> Evaluation:
        folder = Path(folder)
        m = json.loads((folder / "metrics.json").read_text())
        table = pd.read_csv(folder / "per_class.csv", keep_default_na=False)
        return cls(folder=folder, run=Path(m["run"]), data=m["data"], split=m["split"], checkpoint=m["checkpoint"],
                   classes=m["classes"], metrics=m["metrics"], per_class=table, confusion=np.array(m["confusion"]),
                   pictures={n: folder / n for n in PICTURES if (folder / n).is_file()})

    def to_string(self) -> str:
        m, n_cls = self.metrics, len(self.classes)
        top5 = (f"{m['top5_error']:.3f}" if m["top5_error"] is not None
                else f"-      ({n_cls} classes: the top 5 always hold the answer)")
        lines = [
            f"Evaluated {self.run} ({self.checkpoint}) on {self.data}, split {self.split}: "
            f"{m['n']} images, {n_cls} classes",
            f"  top-1 error          {m['top1_error']:.3f}  (accuracy {m['accuracy']:.3f}; always answering "
            f"'{m['majority_class']}' would score {m['majority_accuracy']:.3f})",
            f"  top-5 error          {top5}",
            f"  balanced accuracy    {m['balanced_accuracy']:.3f}  (mean of the per-class recalls)",
            f"  macro F1             {m['macro_f1']:.3f}",
            f"  calibration error    {m['ece']:.3f}  (ECE, {m['n_bins']} bins: 0 = as often right as confident)",
            "",
            self.per_class.to_string(index=False, float_format=lambda v: f"{v:.3f}"),
            "",
            f"written to {self.folder}/: " + ", ".join(sorted(p.name for p in self.folder.iterdir())),
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()


def evaluate(run: str | Path | Run, data: str | Path | None = None, *, csv: str | Path | None = None,
             split: str | None = None, checkpoint: str = "best", batch_size: int = 64, tta: bool = False,
             n_bins: int = 10, n_wrong: int = 16, device: str | None = None, report: bool = True) -> Evaluation:
    """Evaluate a run's checkpoint on ``data`` (an image folder or ``csv``; default: the run's own test split,
    else its val split) and write everything into a new ``RUN/eval-<data>-<split>`` folder.

    ``split`` picks train/val/test of the data (default: test if there is one, else val, else every image).
    """
    from .predict import Predictor

    run = run if isinstance(run, Run) else Run.open(run)
    classes = run.classes
    items, name, split = select_items(run, data, csv=csv, split=split)
    ckpt = run.checkpoint(checkpoint)
    predictor = Predictor.load(ckpt, device=device)
    if predictor.classes != classes:
        raise ValueError(f"{ckpt} predicts {predictor.classes}, the run's classes.json says {classes}")
    probs = predictor.probabilities(items["path"].tolist(), tta=tta, batch_size=batch_size)
    target = torch.tensor([classes.index(c) for c in items["label"]])
    metrics, table, cm = score(probs, target, classes, n_bins=n_bins)
    train = run.items
    table.insert(1, "n_train", [int(((train["split"] == "train") & (train["label"] == c)).sum()) for c in classes])

    folder = next_free(run.path, f"eval-{name}-{split}")
    pred = probs.argmax(-1)
    conf = probs.max(-1).values
    predictions = pd.DataFrame({"path": items["path"].to_numpy(), "label": items["label"].to_numpy(),
                                "predicted": [classes[i] for i in pred], "confidence": conf.numpy().round(6),
                                "correct": (pred == target).numpy()})
    for j, c in enumerate(classes):
        predictions[f"p_{c}"] = probs[:, j].numpy().round(6)
    predictions.to_csv(folder / "predictions.csv", index=False)
    table.to_csv(folder / "per_class.csv", index=False)
    cm_table = pd.DataFrame(cm, index=pd.Index(classes, name="true \\ predicted"), columns=classes)
    cm_table.to_csv(folder / "confusion.csv")
    ckpt_name = str(ckpt.relative_to(run.path))
    record = {"run": str(run.path), "data": name, "data_path": str(data or csv or run.path / "items.csv"),
              "split": split, "checkpoint": ckpt_name, "tta": tta, "classes": classes, "metrics": metrics,
              "confusion": cm.tolist(), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (folder / "metrics.json").write_text(json.dumps(record, indent=2))

    pre = predictor.preprocess
    wrong = predictions[~predictions["correct"]].sort_values("confidence", ascending=False, kind="stable")
    wrong = wrong.head(n_wrong)
    images = [pre.intensity_fn()(read_image(p, pre.channels, max_pixels=pre.max_pixels)) for p in wrong["path"]]
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
    for fname, fig in figures.items():
        plots.save(fig, folder / fname)
    result = Evaluation(folder=folder, run=run.path, data=name, split=split, checkpoint=ckpt_name,
                        classes=classes, metrics=metrics, per_class=table, confusion=cm,
                        pictures={n: folder / n for n in figures})
    if report:
        from .report import write_report
        write_report(run, result, out=folder / "report.html")
    return result


def select_items(run: Run, data: str | Path | None = None, *, csv: str | Path | None = None,
                 split: str | None = None) -> tuple[pd.DataFrame, str, str]:
    """The images to evaluate (path, label), a name for the data and the split used.

    Without data: the run's own items (default split: test if any, else val). With data: a scan of it
    (default split: test, else val, else every image, named 'all'). Labels the run does not know are an error.
    """
    if data is None and csv is None:
        items = run.items
        root = os.path.commonpath(items["path"].tolist()) if len(items) else str(run.path)
        name = Path(root).name
    else:
        from .data import scan
        channels = run.read_json("data.json")["preprocess"]["channels"]
        items = scan(data, csv=csv, channels=channels).items
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
    unknown = sorted(set(items["label"]) - set(run.classes))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not classes of {run.path} ({', '.join(run.classes)}): evaluate "
                         f"on data with the run's classes only")
    return items[["path", "label"]].reset_index(drop=True), re.sub(r"[^\w.-]+", "_", name) or "data", split


def score(probs: torch.Tensor, target: torch.Tensor, classes: list[str],
          n_bins: int = 10) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """torchmetrics on probabilities (N, C) and true indices (N,): the headline numbers, the per-class table
    (class, support, predicted, precision, recall, f1) and the confusion matrix (rows: true, columns: predicted).
    A class with no images gets precision/recall 0 in the table and is left out of the balanced accuracy."""
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


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[:n - 11] + "..." + name[-8:]
