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

from .run import read_logs  # the one log reader (numeric version order)

__all__ = ["figure", "save", "png_bytes", "read_logs", "curves", "class_counts", "per_class", "confusion",
           "reliability_bins", "reliability", "image_grid", "freeze_grid", "freeze_rule"]

SPLIT_COLORS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868", "eval": "#8172b3", "": "#937860"}
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


def curves(log: pd.DataFrame, groups: Sequence[str] | None = None) -> Figure:
    """Loss and accuracy at the end of each epoch, and each param group's learning rate during it, on one
    x axis (epochs done); ``groups`` orders the param groups (default: as logged)."""
    fig = figure(14, 3.9)
    axes = ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    if log.empty or "epoch" not in log:
        for ax in axes:
            ax.text(0.5, 0.5, "no training log", ha="center", va="center", transform=ax.transAxes)
        return fig

    def per_epoch(col: str) -> pd.Series:
        s = log.groupby("epoch")[col].last().dropna()
        return s.set_axis(s.index.astype(int) + 1)

    for ax, col, label, color, style in [
            (ax_loss, "train_loss_epoch", "train", SPLIT_COLORS["train"], "-"),
            (ax_loss, "val_loss", "val", SPLIT_COLORS["val"], "-"),
            (ax_acc, "train_acc", "train accuracy", SPLIT_COLORS["train"], "-"),
            (ax_acc, "val_acc", "val accuracy", SPLIT_COLORS["val"], "-"),
            (ax_acc, "val_recall", "val balanced accuracy (mean recall)", "#c44e52", "--"),
            (ax_acc, "train_f1", "train macro F1 (at 0.5)", SPLIT_COLORS["train"], "-"),
            (ax_acc, "val_map", "val mean average precision", SPLIT_COLORS["val"], "-"),
            (ax_acc, "val_f1", "val macro F1 (at 0.5)", "#c44e52", "--")]:
        if col in log and log[col].notna().any():
            s = per_epoch(col)
            ax.plot(s.index, s.values, style, marker="o", label=label, color=color)
    if "val_acc" in log and log["val_acc"].notna().any():
        k = int(per_epoch("val_acc").idxmax())
        ax_acc.axvline(k, color="0.6", linestyle=":", label=f"best val accuracy ({k} epoch{'s' * (k > 1)} done)")
    ax_loss.set(title="loss", xlabel="epochs done")
    ax_acc.set(title="accuracy" if "val_acc" in log else "scores", xlabel="epochs done", ylim=(0, 1.02))
    for ax in axes:
        ax.set_xlim(-0.05, int(log["epoch"].max()) + 1.05)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in (ax_loss, ax_acc):
        if ax.lines:
            ax.legend(fontsize=8)

    # LearningRateMonitor's columns (lr-AdamW/<group>) by group; a stage's 1-D weights (no_decay) share its rate
    lrs = {c.split("/", 1)[-1] if "/" in c else c[3:]: c for c in log.columns
           if c.startswith("lr-") and not c.endswith("/no_decay")}
    groups = list(groups or [])
    fixed = []
    for name in sorted(lrs, key=lambda g: groups.index(g) if g in groups else len(groups)):
        s = log.groupby("epoch")[lrs[name]].first().dropna()
        if not s.empty and (s == 0).all():
            fixed.append(name)
        elif not s.empty:
            ax_lr.plot(s.index.astype(float), s.where(s > 0), marker=".", label=name, linewidth=1.5)
    ax_lr.set(title="learning rate per param group at each epoch's start\n(log scale; no point = fixed)",
              xlabel="epochs done", ylabel="lr")
    if ax_lr.lines:
        ax_lr.set_yscale("log")
        ax_lr.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if fixed:
        ax_lr.text(1.03, 0.0, textwrap.fill("fixed, lr 0 throughout: " + ", ".join(fixed), 28),
                   transform=ax_lr.transAxes, va="bottom", fontsize=7, color="0.3")
    elif not lrs:
        ax_lr.text(0.5, 0.5, "no learning-rate columns in the log", ha="center", va="center",
                   transform=ax_lr.transAxes)
    return fig


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
    first = table[splits[0]][lambda c: c > 0]  # the imbalance of the first split's classes with images
    ratio = first.max() / first.min() if len(first) > 1 else None
    note = ("" if ratio is None else " — balanced" if ratio < 1.5 else
            f" — {first.name or 'all'}: largest/smallest class = {ratio:.1f}x")
    ax.set_title(f"Images per class and split{note}", fontsize=11)
    return fig


def per_class(table: pd.DataFrame) -> Figure:
    """Images per class (train, evaluated) beside each class's precision, recall and F1, on the same rows."""
    classes = table["class"].tolist()
    fig = figure(12, 1.6 + 0.7 * len(classes))
    ax_n, ax_m = fig.subplots(1, 2, sharey=True, width_ratios=[1, 1.5])
    y = np.arange(len(classes))
    for i, (col, label, split) in enumerate([("n_train", "train", "train"), ("support", "evaluated", "eval")]):
        if col in table:
            bars = ax_n.barh(y - 0.2 + 0.4 * i, table[col], height=0.4, label=label, color=SPLIT_COLORS[split])
            ax_n.bar_label(bars, fontsize=8, padding=2)
    ax_n.set(title="images per class", xlabel="images",
             xlim=(0, max(1, table.filter(["n_train", "support"]).to_numpy().max()) * 1.25))
    ax_n.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
    ax_n.set_yticks(y, classes)
    ax_n.invert_yaxis()
    for i, (m, label, color) in enumerate([("precision", "precision (share of its predictions right)", "#4c72b0"),
                                           ("recall", "recall (share of the class found)", "#c44e52"),
                                           ("f1", "F1", "#8c8c8c")]):
        bars = ax_m.barh(y - 0.27 + 0.27 * i, table[m], height=0.27, color=color, label=label)
        ax_m.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax_m.set(title="results per class", xlim=(0, 1.12), xlabel="score")
    ax_m.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, frameon=False)
    for ax in (ax_n, ax_m):
        ax.grid(axis="x", alpha=0.3)
    return fig


def confusion(cm: np.ndarray, classes: Sequence[str]) -> Figure:
    """The confusion matrix twice, coloured by share of each true class (recall) and of each predicted class
    (precision), which differ with imbalanced classes."""
    cm = np.asarray(cm)
    n = len(classes)
    side = min(9, 2.6 + 0.75 * n)
    fig = figure(2 * side + 1.2, side + 0.4, layout="compressed")
    for ax, axis, what in zip(fig.subplots(1, 2), (1, 0), ("true class (row)", "predicted class (column)")):
        total = cm.sum(axis=axis, keepdims=True)
        share = np.divide(cm, total, out=np.zeros(cm.shape, dtype=float), where=total > 0)
        im = ax.imshow(share, cmap="Blues" if axis == 1 else "Oranges", vmin=0, vmax=1)
        if n <= 30:
            for (i, j), v in np.ndenumerate(share):
                pct = "<1%" if 0 < v < 0.005 else f"{v:.0%}"
                ax.text(j, i, f"{cm[i, j]}\n{pct}", ha="center", va="center", fontsize=9 if n <= 10 else 6,
                        color="white" if v > 0.55 else "black")
        ax.set_xticks(range(n), [f"{c}\n({int(k)})" for c, k in zip(classes, cm.sum(axis=0))],
                      rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
        ax.set_yticks(range(n), [f"{c} ({int(k)})" for c, k in zip(classes, cm.sum(axis=1))])
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
    """Reliability diagram: accuracy against confidence per bin (on the diagonal = calibrated) over the bins' counts."""
    bins = reliability_bins(confidence, correct, n_bins)
    bins["mid"], bins["gap"] = (bins["low"] + bins["high"]) / 2, (bins["accuracy"] - bins["confidence"]).abs()
    if ece is None:
        ece = float(np.nansum(bins["count"] * bins["gap"]) / max(1, bins["count"].sum()))
    fig = figure(7, 7)
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = 0.95 / n_bins
    seen = bins[bins["count"] > 0]
    ax.bar(seen["mid"], seen["accuracy"], width=width, color="#4c72b0", label="accuracy in the bin")
    ax.bar(seen["mid"], seen["gap"], bottom=seen[["accuracy", "confidence"]].min(axis=1), width=width,
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
    bars = ax_n.bar(bins["mid"], bins["count"], width=width, color="0.55")
    ax_n.bar_label(bars, labels=[str(c) if c else "" for c in bins["count"]], fontsize=7, padding=1)
    ax_n.set(xlabel="confidence (probability of the predicted class)", ylabel="predictions",
             ylim=(0, max(1, bins["count"].max()) * 1.3))
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], columns: int = 4,
               title: str = "", empty: str = "no images") -> Figure:
    """Images (HxWxC float in [0, 1]; 1 channel gray, 3 RGB, others their first channel) with a title each."""
    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    fig = figure(2.6 * cols + 0.4, 2.9 * rows + 0.5)
    if title:
        fig.suptitle(title, fontsize=11)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    if not n:
        axes[0].text(0.5, 0.5, empty, ha="center", va="center", fontsize=12)
    for ax, img, t in zip(axes, images, titles):
        img = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
        if img.ndim == 3 and img.shape[-1] == 3:
            ax.imshow(img)
        else:
            ax.imshow(img if img.ndim == 2 else img[..., 0], cmap="gray", vmin=0, vmax=1)
        ax.set_title(t, fontsize=9, color="#a00000")
    return fig


def freeze_grid(results: pd.DataFrame, metric: str = "val_acc") -> Figure:
    """Score against fixed depth, a panel a dataset and a line a training-set size, automatic plans as stars (or
    dashed lines); from benchmarks/results/freeze_grid.csv (``plan``/``fixed_depth``) or a ``depth`` column."""
    df = results.copy()
    if "plan" not in df:
        df["plan"] = [("auto" if str(d) == "auto" else f"fixed{int(d)}") for d in df["depth"]]
    df["fixed_depth"] = pd.to_numeric(df["fixed_depth"] if "fixed_depth" in df else df.get("depth"), errors="coerce")
    datasets = list(dict.fromkeys(df["dataset"]))
    fig = figure(4.6 * max(1, len(datasets)), 4.2)
    axes = fig.subplots(1, max(1, len(datasets)), squeeze=False)[0]
    for ax, (name, d) in zip(axes, df.groupby("dataset", sort=False)):
        for i, (per, g) in enumerate(d.groupby("per_class")):
            color = f"C{i}"
            plan = g["plan"].astype(str)
            fixed = g[plan.str.startswith("fixed")].sort_values("fixed_depth")
            ax.plot(fixed["fixed_depth"], fixed[metric], marker="o", color=color, label=f"{per} a class: fixed depth")
            for _, row in g[plan.str.startswith("auto")].iterrows():
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
    cs = ax.contourf(per, dist, trained, levels=np.arange(-0.5, n_groups + 1), cmap="viridis")
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
    """F1 of each label against its threshold (``sweep``: columns threshold, label, f1), the chosen one marked."""
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
