"""Multi-label data (a ``;``-separated cell or one 0/1 column a label), iterative stratification, average precision
and per-label thresholds; a label set is one sorted ``;``-joined ``label`` string, so the rest treats it as usual."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # torch and torchmetrics load where a model is scored: scanning data does not wait for them
    import torch

SEP = ";"
#: separators people use instead of ';' (a cell holding one of these is refused: the split would be a guess)
_FOREIGN = {",": "comma", "|": "bar", "\t": "tab"}


class LabelError(ValueError):
    """A label cell cannot be read as a label set; the message names the line and the cell."""


def csv_labels(df: pd.DataFrame, source: str) -> tuple[pd.DataFrame, list[str]] | None:
    """``df`` with a sorted ';'-joined ``label`` set a row in place of its label cells (a ``labels`` column, or a
    ``label`` column with ';' in it) or of its 0/1 columns (one a label, next to ``path`` and ``split``), and warnings;
    None for single-label data. Raises LabelError for a cell that uses another separator."""
    cols = {c.lower(): c for c in df.columns}
    rest = [c for c in df.columns if c.lower() not in ("path", "split")]
    warnings: list[str] = []
    if "labels" in cols or ("label" in cols and df[cols["label"]].astype(str).str.contains(SEP, regex=False).any()):
        cells = []
        for line, raw in enumerate(df[cols.get("labels") or cols["label"]].astype(str), start=2):  # header: line 1
            for sep, name in _FOREIGN.items():
                if sep in raw:
                    raise LabelError(f"{source} line {line}: label cell {raw!r} contains a {name} ({sep!r}); "
                                     f"separate labels with ';' (e.g. {SEP.join(p.strip() for p in raw.split(sep))!r})")
            parts = [p.strip() for p in raw.split(SEP) if p.strip()]
            if len(set(parts)) < len(parts):
                twice = sorted({p for p in parts if parts.count(p) > 1})
                warnings.append(f"line {line}: label cell {raw!r} names {', '.join(twice)} more than once; "
                                f"counted once")
            cells.append(SEP.join(sorted(set(parts))))
        df = df.drop(columns=[c for c in df.columns if c.lower() in ("label", "labels")])
    elif "label" not in cols and len(rest) >= 2 and all(df[c].astype(str).str.strip().isin(["0", "1"]).all()
                                                        for c in rest):
        hot = df[rest].astype(str).apply(lambda s: s.str.strip()).to_numpy() == "1"
        cells = [SEP.join(sorted(str(c).strip() for c, on in zip(rest, row) if on)) for row in hot]
        df = df.drop(columns=rest)
    else:
        return None
    counts = pd.Series([lab for c in cells for lab in c.split(SEP) if lab]).value_counts()
    warnings += [f"label '{lab}' appears on only 1 image: it stays in train, with none to validate on"
                 for lab in sorted(counts[counts == 1].index)]
    return df.assign(label=cells), warnings


def label_sets(labels: pd.Series) -> list[list[str]]:
    return [[lab for lab in str(c).split(SEP) if lab] for c in labels]


def classes_of(labels: pd.Series) -> list[str]:
    """The sorted labels that occur in any cell."""
    return sorted({lab for s in label_sets(labels) for lab in s})


def matrix(labels: pd.Series, classes: list[str]) -> np.ndarray:
    """Multi-hot matrix (images x labels), float32."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(labels), len(classes)), dtype=np.float32)
    for row, s in enumerate(label_sets(labels)):
        out[row, [index[lab] for lab in s]] = 1.0
    return out


def stratified_val(pool: pd.DataFrame, fraction: float, seed: int) -> list:
    """Index labels of a validation share keeping every label's share on both sides (iterative stratification)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    y = matrix(pool["label"], classes_of(pool["label"]))
    y = np.concatenate([y, (y.sum(axis=1) == 0)[:, None].astype(np.float32)], axis=1)  # "no label" counts too
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, val = next(splitter.split(np.zeros(len(pool)), y))
    return pool.index[np.sort(val)].tolist()


def counts_report(items: pd.DataFrame, classes: list[str]) -> str:
    """Per-label image counts by split, images without a label, labels an image, and label co-occurrence."""
    y = matrix(items["label"], classes)
    splits = items["split"].replace("", "unsplit")
    table = pd.DataFrame({s: y[(splits == s).to_numpy()].sum(axis=0).astype(int) for s in splits.unique()},
                         index=pd.Index(classes, name="label"))
    table["total"] = y.sum(axis=0).astype(int)
    per_image = pd.Series(y.sum(axis=1).astype(int)).value_counts().sort_index()
    co = pd.DataFrame((y.T @ y).astype(int), index=classes, columns=classes)
    return "\n".join([
        f"multi-label: {len(classes)} labels; {int((y.sum(axis=1) == 0).sum())} images without a label; labels an "
        "image: " + ", ".join(f"{k}: {v}" for k, v in per_image.items()), "", table.to_string(), "",
        "co-occurrence (images carrying both; the diagonal is each label's count):", co.to_string(), ""])


def images_a_label(items: pd.DataFrame, classes: list[str]) -> float:
    """Mean number of training images carrying a label: what the freeze policy counts as 'images a class'."""
    train = items[items["split"] == "train"]
    return float(matrix(train["label"], classes).sum(axis=0).mean()) if len(classes) else 0.0


def pos_weight(y: np.ndarray, cap: float = 20.0) -> torch.Tensor:
    """BCE positive weights: negatives over positives per label (capped), for ``loss.balance: weights``."""
    import torch
    pos = y.sum(axis=0)
    return torch.as_tensor(np.clip((len(y) - pos) / np.maximum(pos, 1), 1.0, cap), dtype=torch.float32)


def best_thresholds(probs: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Per label, the probability threshold that maximises its F1 on these images (see thresholds_from_curve)."""
    from torchmetrics.classification import MultilabelPrecisionRecallCurve
    return thresholds_from_curve(MultilabelPrecisionRecallCurve(num_labels=probs.shape[1])(probs, target.int()))


def thresholds_from_curve(curve: tuple) -> list[float]:
    """Each label's F1-maximising threshold on torchmetrics' multilabel PR curve; 0.5 where F1 is 0 (no positives)."""
    out = []
    for p, r, t in zip(*curve):
        f1 = (2 * p * r / (p + r).clamp(min=1e-12)).nan_to_num(0.0)[:-1]  # the last point has no threshold
        out.append(float(t[int(f1.argmax())]) if len(t) and f1.max() > 0 else 0.5)
    return out


def decide(probs: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """0/1 decisions: a label is present when its probability reaches its threshold."""
    import torch
    return (probs >= torch.as_tensor(thresholds, dtype=probs.dtype)).int()


def score(probs: torch.Tensor, target: torch.Tensor, classes: list[str],
          thresholds: list[float]) -> tuple[dict, pd.DataFrame]:
    """Mean average precision over labels, macro/micro F1 at the thresholds, and the per-label table (label,
    support, AP, precision, recall, F1, threshold)."""
    from torchmetrics.classification import (MultilabelAveragePrecision, MultilabelF1Score, MultilabelPrecision,
                                             MultilabelRecall)
    n, t = len(classes), target.int()
    pred = decide(probs, thresholds)
    table = pd.DataFrame({"label": classes, "support": t.sum(0).numpy(), "predicted": pred.sum(0).numpy(),
                          "ap": MultilabelAveragePrecision(n, average=None)(probs, t).numpy(),
                          "precision": MultilabelPrecision(n, average=None)(pred, t).numpy(),
                          "recall": MultilabelRecall(n, average=None)(pred, t).numpy(),
                          "f1": MultilabelF1Score(n, average=None)(pred.float(), t).numpy(),
                          "threshold": thresholds})
    present = table["support"] > 0
    metrics = {"n": int(len(t)), "map": float(table.loc[present, "ap"].mean()),
               "macro_f1": float(table.loc[present, "f1"].mean()),
               "micro_f1": float(MultilabelF1Score(n, average="micro")(pred.float(), t)),
               "exact_match": float((pred == t).all(1).float().mean()),
               "labels_without_images": [c for c, p in zip(classes, present) if not p]}
    return metrics, table


def pr_curves(probs: torch.Tensor, target: torch.Tensor, classes: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label -> (precision, recall) along the label's thresholds."""
    from torchmetrics.classification import MultilabelPrecisionRecallCurve
    precision, recall, _ = MultilabelPrecisionRecallCurve(num_labels=len(classes))(probs, target.int())
    return {c: (p.numpy(), r.numpy()) for c, p, r in zip(classes, precision, recall)}


def f1_sweep(probs: torch.Tensor, target: torch.Tensor, classes: list[str], steps: int = 99) -> pd.DataFrame:
    """F1 of every label at evenly spaced thresholds (columns threshold, label, f1)."""
    import torch
    grid, t, rows = torch.linspace(0.01, 0.99, steps), target.int(), []
    for th in grid:
        pred = (probs >= th).int()
        tp, fp, fn = (pred * t).sum(0), (pred * (1 - t)).sum(0), ((1 - pred) * t).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        rows += [(float(th), c, float(v)) for c, v in zip(classes, f1)]
    return pd.DataFrame(rows, columns=["threshold", "label", "f1"])
