"""Pictures of a run and of an evaluation, as matplotlib Figures on the Agg canvas (no pyplot, no global state);
:func:`save` writes one as PNG, :func:`png_bytes` gives the bytes (the HTML report inlines them)."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["figure", "save", "png_bytes", "read_logs", "curves", "class_counts", "per_class", "confusion",
           "reliability_bins", "reliability", "image_grid", "freeze_grid", "freeze_rule"]

SPLIT_COLORS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868", "eval": "#8172b3", "": "#937860"}
METRIC_COLORS = {"precision": "#4c72b0", "recall": "#c44e52", "f1": "#8c8c8c"}
DPI = 100


def figure(width: float, height: float, layout: str = "constrained") -> Figure:
    """A new Figure with its own Agg canvas ('compressed' layout suits fixed-aspect images)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path | io.BytesIO) -> Path | io.BytesIO:
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")
    return path if isinstance(path, io.BytesIO) else Path(path)


def png_bytes(fig: Figure) -> bytes:
    return save(fig, io.BytesIO()).getvalue()


# -- training ----------------------------------------------------------------------------------------------------

from .run import read_logs  # noqa: E402 - the one log reader (numeric version order)


def lr_columns(log: pd.DataFrame) -> dict[str, str]:
    """Learning-rate columns of LearningRateMonitor (``lr-AdamW/<group>``) by group name."""
    return {c.split("/", 1)[-1] if "/" in c else c[3:]: c for c in log.columns
            if c.startswith("lr-") and not c.endswith("/no_decay")}  # a stage's 1-D weights share its rate


def curves(log: pd.DataFrame, groups: Sequence[str] | None = None) -> Figure:
    """Loss and accuracy at the end of each epoch, and each param group's learning rate during it, on one
    x axis (epochs done); ``groups`` orders the param groups (default: as logged)."""
    fig = figure(14, 3.9)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    if log.empty or "epoch" not in log:
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.text(0.5, 0.5, "no training log", ha="center", va="center", transform=ax.transAxes)
        return fig

    def per_epoch(col: str) -> pd.Series:
        s = log[["epoch", col]].dropna().groupby("epoch")[col].last()
        s.index = s.index.astype(int) + 1
        return s

    for col, label in [("train_loss_epoch", "train"), ("val_loss", "val")]:
        if col in log and log[col].notna().any():
            s = per_epoch(col)
            ax_loss.plot(s.index, s.values, "-", marker="o", label=label, color=SPLIT_COLORS[label])
    ax_loss.set(title="loss", xlabel="epochs done")
    for col, label, color in [("train_acc", "train accuracy", SPLIT_COLORS["train"]),
                              ("val_acc", "val accuracy", SPLIT_COLORS["val"]),
                              ("val_recall", "val balanced accuracy (mean recall)", "#c44e52"),
                              ("train_f1", "train macro F1 (at 0.5)", SPLIT_COLORS["train"]),
                              ("val_map", "val mean average precision", SPLIT_COLORS["val"]),
                              ("val_f1", "val macro F1 (at 0.5)", "#c44e52")]:
        if col in log and log[col].notna().any():
            s = per_epoch(col)
            ax_acc.plot(s.index, s.values, marker="o", label=label, color=color,
                        linestyle="--" if col in ("val_recall", "val_f1") else "-")
    if "val_acc" in log and log["val_acc"].notna().any():
        k = int(per_epoch("val_acc").idxmax())
        ax_acc.axvline(k, color="0.6", linestyle=":", label=f"best val accuracy ({k} epoch{'s' * (k > 1)} done)")
    ax_acc.set(title="accuracy" if "val_acc" in log else "scores", xlabel="epochs done", ylim=(0, 1.02))
    n_epochs = int(log["epoch"].max()) + 1
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlim(-0.05, n_epochs + 0.05)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)

    cols = lr_columns(log)
    order = [g for g in (groups or []) if g in cols] + [g for g in cols if g not in (groups or [])]
    fixed = []
    for name in order:
        col = cols[name]
        s = log[["epoch", col]].dropna().groupby("epoch")[col].first()
        if s.empty:
            continue
        if (s == 0).all():
            fixed.append(name)
            continue
        y = s.to_numpy(dtype=float)
        ax_lr.plot(s.index.to_numpy(dtype=float), np.where(y > 0, y, np.nan), marker=".", label=name, linewidth=1.5)
    ax_lr.set(title="learning rate per param group at each epoch's start\n(log scale; no point = fixed)",
              xlabel="epochs done", ylabel="lr")
    if ax_lr.lines:
        ax_lr.set_yscale("log")
        ax_lr.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax_lr.grid(alpha=0.3)
    if fixed:
        ax_lr.text(1.03, 0.0, textwrap.fill("fixed, lr 0 throughout: " + ", ".join(fixed), 28),
                   transform=ax_lr.transAxes, va="bottom", fontsize=7, color="0.3")
    elif not cols:
        ax_lr.text(0.5, 0.5, "no learning-rate columns in the log", ha="center", va="center",
                   transform=ax_lr.transAxes)
    return fig


# -- data and per-class results ----------------------------------------------------------------------------------

def class_counts(items: pd.DataFrame, classes: Sequence[str]) -> Figure:
    """Images per class in each split, so imbalance is visible at a glance."""
    splits = [s for s in ("train", "val", "test", "") if s in set(items["split"])]
    table = pd.crosstab(items["label"], items["split"]).reindex(index=list(classes), columns=splits, fill_value=0)
    fig = figure(8, 0.9 + 0.55 * len(classes) * max(1, len(splits)) ** 0.5)
    ax = fig.subplots()
    h = 0.8 / len(splits)
    y = np.arange(len(classes))
    for i, s in enumerate(splits):
        vals = table[s].to_numpy()
        bars = ax.barh(y - 0.4 + h * (i + 0.5), vals, height=h, color=SPLIT_COLORS.get(s, "0.5"),
                       label=s or "unsplit")
        ax.bar_label(bars, labels=[f"{v} ({v / max(1, vals.sum()):.0%})" for v in vals], fontsize=8, padding=2)
    ax.set_yticks(y, list(classes))
    ax.invert_yaxis()
    ax.set(xlabel="images", xlim=(0, table.to_numpy().max() * 1.25 + 1))
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Images per class and split{_imbalance_note(table[splits[0]])}", fontsize=11)
    return fig


def _imbalance_note(counts: pd.Series) -> str:
    nonzero = counts[counts > 0]
    if len(nonzero) < 2:
        return ""
    ratio = nonzero.max() / nonzero.min()
    return f" — {counts.name or 'all'}: largest/smallest class = {ratio:.1f}x" if ratio >= 1.5 else " — balanced"


def per_class(table: pd.DataFrame) -> Figure:
    """Left: training and evaluation images per class; right: precision, recall and F1 of each class on the
    same rows, so a rare class's short bar on the left lines up with its result on the right."""
    classes = table["class"].tolist()
    fig = figure(12, 1.6 + 0.7 * len(classes))
    ax_n, ax_m = fig.subplots(1, 2, sharey=True, width_ratios=[1, 1.5])
    y = np.arange(len(classes))
    for i, (col, label) in enumerate([("n_train", "train"), ("support", "evaluated")]):
        if col not in table:
            continue
        bars = ax_n.barh(y - 0.2 + 0.4 * i, table[col], height=0.4, label=label,
                         color=SPLIT_COLORS["train" if col == "n_train" else "eval"])
        ax_n.bar_label(bars, fontsize=8, padding=2)
    ax_n.set(title="images per class", xlabel="images",
             xlim=(0, max(1, table[[c for c in ("n_train", "support") if c in table]].to_numpy().max()) * 1.25))
    ax_n.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
    ax_n.set_yticks(y, classes)
    ax_n.invert_yaxis()
    for i, m in enumerate(("precision", "recall", "f1")):
        bars = ax_m.barh(y - 0.27 + 0.27 * i, table[m], height=0.27, color=METRIC_COLORS[m],
                         label={"f1": "F1", "recall": "recall (share of the class found)",
                                "precision": "precision (share of its predictions right)"}[m])
        ax_m.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax_m.set(title="results per class", xlim=(0, 1.12), xlabel="score")
    ax_m.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, frameon=False)
    for ax in (ax_n, ax_m):
        ax.grid(axis="x", alpha=0.3)
    return fig


def confusion(cm: np.ndarray, classes: Sequence[str]) -> Figure:
    """The confusion matrix twice, counts in every cell, coloured by share of each true class (rows: recall) and of
    each predicted class (columns: precision), which differ with imbalanced classes."""
    cm = np.asarray(cm)
    n = len(classes)
    side = min(9, 2.6 + 0.75 * n)
    fig = figure(2 * side + 1.2, side + 0.4, layout="compressed")
    for ax, axis, what in zip(fig.subplots(1, 2), (1, 0), ("true class (row)", "predicted class (column)")):
        total = cm.sum(axis=axis, keepdims=True)
        share = np.divide(cm, total, out=np.zeros(cm.shape, dtype=float), where=total > 0)
        im = ax.imshow(share, cmap="Blues" if axis == 1 else "Oranges", vmin=0, vmax=1)
        if n <= 30:
            for i in range(n):
                for j in range(n):
                    pct = "<1%" if 0 < share[i, j] < 0.005 else f"{share[i, j]:.0%}"
                    ax.text(j, i, f"{cm[i, j]}\n{pct}", ha="center", va="center", fontsize=9 if n <= 10 else 6,
                            color="white" if share[i, j] > 0.55 else "black")
        rows, cols = cm.sum(axis=1), cm.sum(axis=0)
        ax.set_xticks(range(n), [f"{c}\n({int(k)})" for c, k in zip(classes, cols)], rotation=45 if n > 4 else 0,
                      ha="right" if n > 4 else "center")
        ax.set_yticks(range(n), [f"{c} ({int(k)})" for c, k in zip(classes, rows)])
        ax.set(xlabel="predicted class (images called so)", ylabel="true class (images)" if axis == 1 else "",
               title=f"share of each {what}:\n" + ("how much of each class is found (recall)" if axis == 1 else
                                                    "how many of its predictions are right (precision)"))
        fig.colorbar(im, ax=ax, shrink=0.7, label=f"share of the {what}")
    fig.suptitle("Confusion matrix: the same counts, coloured two ways", fontsize=12)
    return fig


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Equal-width confidence bins (torchmetrics' binning): count, mean confidence and accuracy of each; the
    expected calibration error is ``sum(count * |accuracy - confidence|) / total``."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, confidence, minlength=n_bins) / count
        acc = np.bincount(idx, correct, minlength=n_bins) / count
    return pd.DataFrame({"low": edges[:-1], "high": edges[1:], "count": count, "confidence": conf, "accuracy": acc})


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10, ece: float | None = None) -> Figure:
    """Reliability diagram: accuracy against confidence per bin (on the diagonal = calibrated), and how many
    predictions fall in each bin."""
    bins = reliability_bins(confidence, correct, n_bins)
    if ece is None:
        gaps = bins["count"] * (bins["accuracy"] - bins["confidence"]).abs()
        ece = float(np.nansum(gaps) / max(1, bins["count"].sum()))
    fig = figure(7, 7)
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = 1 / n_bins
    mid = (bins["low"] + bins["high"]) / 2
    have = bins["count"] > 0
    ax.bar(mid[have], bins["accuracy"][have], width=width * 0.95, color="#4c72b0", label="accuracy in the bin")
    gap_low = np.minimum(bins["accuracy"], bins["confidence"])[have]
    ax.bar(mid[have], (bins["accuracy"] - bins["confidence"]).abs()[have], bottom=gap_low, width=width * 0.95,
           color="none", edgecolor="#c44e52", hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="0.4", label="perfect calibration")
    acc, conf = float(np.mean(correct)), float(np.mean(confidence))
    way = ("underconfident: right more often than it says" if acc - conf > 0.02 else
           "overconfident: right less often than it says" if conf - acc > 0.02 else "about as often right as it says")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
           title=f"Reliability: expected calibration error {ece:.3f} ({n_bins} bins)\n"
                 f"accuracy {acc:.2f}, mean confidence {conf:.2f}:\n{way}")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    bars = ax_n.bar(mid, bins["count"], width=width * 0.95, color="0.55")
    ax_n.bar_label(bars, labels=[str(c) if c else "" for c in bins["count"]], fontsize=7, padding=1)
    ax_n.set(xlabel="confidence (probability of the predicted class)", ylabel="predictions",
             ylim=(0, max(1, bins["count"].max()) * 1.3))
    return fig


# -- images ------------------------------------------------------------------------------------------------------

def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], columns: int = 4,
               title: str = "", empty: str = "no images") -> Figure:
    """Images (HxWxC float in [0, 1]; 1 channel gray, 3 RGB, others their first channel) with a title each."""
    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    fig = figure(2.6 * cols + 0.4, 2.9 * rows + 0.5)
    if title:
        fig.suptitle(title, fontsize=11)
    if not n:
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=12)
        return fig
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, img, t in zip(axes, images, titles):
        img = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
        if img.ndim == 3 and img.shape[-1] == 3:
            ax.imshow(img)
        else:
            ax.imshow(img if img.ndim == 2 else img[..., 0], cmap="gray", vmin=0, vmax=1)
        ax.set_title(t, fontsize=9, color="#a00000")
    return fig


# -- freeze policies ---------------------------------------------------------------------------------------------

def freeze_grid(results: pd.DataFrame, metric: str = "val_acc") -> Figure:
    """Score against fixed depth, a panel a dataset and a line a training-set size, automatic plans as stars (or
    dashed lines); from benchmarks/results/freeze_grid.csv (``plan``/``fixed_depth``) or a ``depth`` column."""
    df = results.copy()
    if "plan" not in df:
        df["plan"] = [("auto" if str(d) == "auto" else f"fixed{int(d)}") for d in df["depth"]]
    if "fixed_depth" not in df:
        df["fixed_depth"] = pd.to_numeric(df.get("depth"), errors="coerce")
    df["fixed_depth"] = pd.to_numeric(df["fixed_depth"], errors="coerce")
    datasets = list(dict.fromkeys(df["dataset"]))
    fig = figure(4.6 * max(1, len(datasets)), 4.2)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(datasets)), squeeze=False)).ravel()
    for ax, name in zip(axes, datasets):
        d = df[df["dataset"] == name]
        for i, (per, g) in enumerate(d.groupby("per_class", sort=True)):
            color = f"C{i}"
            fixed = g[g["plan"].astype(str).str.startswith("fixed")].sort_values("fixed_depth")
            ax.plot(fixed["fixed_depth"], fixed[metric], marker="o", color=color, label=f"{per} a class: fixed depth")
            for _, row in g[g["plan"].astype(str).str.startswith("auto")].iterrows():
                if np.isfinite(row["fixed_depth"]):
                    ax.plot(row["fixed_depth"], row[metric], marker="*", markersize=16, color=color,
                            markeredgecolor="black", linestyle="none", label=f"{per} a class: {row['plan']}")
                else:
                    ax.axhline(row[metric], color=color, linestyle="--", label=f"{per} a class: {row['plan']}")
        ax.set(title=str(name), xlabel="fixed leading groups (0 = full fine-tuning, max = linear probe)", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    return fig


def freeze_rule(points: pd.DataFrame | None = None, n_groups: int = 8) -> Figure:
    """The automatic rule as a map: how many of ``n_groups`` backbone groups are fine-tuned for each (images a
    class, distance to ImageNet); ``points`` (columns dataset, per_class, distance) are marked on it."""
    from .freeze import trainable_share

    per = np.logspace(0, 3.3, 160)
    dist = np.linspace(0, 1, 101)
    trained = np.array([[round(trainable_share(p, 1, d) * n_groups) for p in per] for d in dist])
    fig = figure(7.5, 4.8)
    ax = fig.subplots()
    levels = np.arange(-0.5, n_groups + 1)
    cs = ax.contourf(per, dist, trained, levels=levels, cmap="viridis")
    fig.colorbar(cs, ax=ax, ticks=range(n_groups + 1), label=f"backbone groups fine-tuned (of {n_groups})")
    ax.set_xscale("log")
    ax.set(xlabel="training images a class", ylabel="distance to ImageNet (0 = ImageNet-like)",
           title="The automatic freeze rule: share = data score x (0.5 + distance)")
    if points is not None:
        for _, r in points.iterrows():
            ax.plot(r["per_class"], r["distance"], "o", color="white", markeredgecolor="black", markersize=8)
            ax.annotate(str(r["dataset"]), (r["per_class"], r["distance"]), textcoords="offset points",
                        xytext=(6, 6), color="white", fontsize=9, fontweight="bold")
    return fig


# -- multi-label -------------------------------------------------------------------------------------------------

def per_label(table: pd.DataFrame) -> Figure:
    """Per label: average precision and F1 at its threshold, with the label's support written beside it."""
    labels = table["label"].tolist()
    fig = figure(10, 1.4 + 0.45 * len(labels))
    ax = fig.subplots()
    y = np.arange(len(labels))
    for i, (col, name, color) in enumerate([("ap", "average precision", "#4c72b0"),
                                            ("f1", "F1 at the label's threshold", "#8c8c8c")]):
        bars = ax.barh(y - 0.2 + 0.4 * i, table[col], height=0.4, color=color, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_yticks(y, [f"{lab}  (n={n})" for lab, n in zip(labels, table["support"])])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.1), xlabel="score", title="Results per label (n: images carrying the label)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return fig


def pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], ap: dict[str, float]) -> Figure:
    """Precision against recall for every label (``curves``: label -> (precision, recall))."""
    fig = figure(7.5, 6)
    ax = fig.subplots()
    for lab, (p, r) in curves.items():
        ax.plot(r, p, linewidth=1.3, label=f"{lab} (AP {ap[lab]:.2f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title="Precision-recall per label")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return fig


def cooccurrence(y: np.ndarray, labels: Sequence[str]) -> Figure:
    """Images carrying both labels (the diagonal: each label's count), coloured by the share of the row's label."""
    co = (y.T @ y).astype(int)
    share = co / np.maximum(np.diag(co)[:, None], 1)
    side = max(4.5, 1.2 + 0.5 * len(labels))
    fig = figure(side + 1.5, side + 0.6, layout="compressed")
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Purples", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(co):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title("Label co-occurrence in the data\n(colour: share of the row label's images)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def threshold_f1(sweep: pd.DataFrame, thresholds: dict[str, float]) -> Figure:
    """F1 of each label against its decision threshold (``sweep``: columns threshold, label, f1), the chosen
    threshold marked."""
    fig = figure(8, 5)
    ax = fig.subplots()
    for lab, rows in sweep.groupby("label", sort=False):
        line, = ax.plot(rows["threshold"], rows["f1"], linewidth=1.2, label=lab)
        t = thresholds[lab]
        ax.plot([t], [np.interp(t, rows["threshold"], rows["f1"])], "o", color=line.get_color(), markersize=5)
    ax.set(xlabel="threshold on the label's probability", ylabel="F1", xlim=(0, 1), ylim=(0, 1.02),
           title="F1 against the decision threshold (dot: the threshold chosen on the validation split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    return fig
