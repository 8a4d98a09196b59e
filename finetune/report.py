"""An evaluation's record (:class:`Evaluation`) and a run as one self-contained HTML page (results, pictures inline
as base64 PNG, curves, data, plan, recipe; no scripts, no links), so it can be mailed or archived."""
from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import multilabel, plots
from .data import counts_table
from .run import Run

__all__ = ["Evaluation", "PICTURES", "write_report", "render", "latest_evaluation", "notes"]

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
#: the pictures of a multi-label evaluation (with wrong.png and curves.png above)
MULTILABEL_PICTURES = {
    "per_label.png": "Average precision and F1 (at the label's threshold) of each label, with its number of images.",
    "pr_curves.png": "Precision against recall for each label, over all thresholds.",
    "threshold_f1.png": "F1 of each label against its decision threshold; the dot is the threshold the run chose on "
                        "its validation images.",
    "cooccurrence.png": "How often two labels appear on the same image in the run's data.",
}


@dataclass
class Evaluation:
    """The result of :func:`finetune.evaluate.evaluate`; ``load`` reads one back from its folder."""

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
    warnings: list[str] = field(default_factory=list)  # skipped files, overlap with the training split

    @classmethod
    def load(cls, folder: str | Path) -> Evaluation:
        folder = Path(folder)
        m = json.loads((folder / "metrics.json").read_text())
        table = pd.read_csv(folder / "per_class.csv", keep_default_na=False)
        return cls(folder=folder, run=Path(m["run"]), data=m["data"], split=m["split"], checkpoint=m["checkpoint"],
                   classes=m["classes"], metrics=m["metrics"], per_class=table, confusion=np.array(m["confusion"]),
                   pictures={n: folder / n for n in {**PICTURES, **MULTILABEL_PICTURES} if (folder / n).is_file()},
                   warnings=m.get("warnings", []))

    @property
    def multilabel(self) -> bool:
        return "map" in self.metrics

    def to_string(self) -> str:
        m, n_cls = self.metrics, len(self.classes)
        head = f"Evaluated {self.run} ({self.checkpoint}) on {self.data}, split {self.split}: {m['n']} images, "
        if self.multilabel:
            lines = [head + f"{n_cls} labels (multi-label)",
                     f"  mean average precision  {m['map']:.3f}  (over labels; independent of thresholds)",
                     f"  macro F1                {m['macro_f1']:.3f}  (at each label's threshold)",
                     f"  micro F1                {m['micro_f1']:.3f}",
                     f"  exact label set         {m['exact_match']:.3f}"]
        else:
            top5 = (f"{m['top5_error']:.3f}" if m["top5_error"] is not None
                    else f"-      ({n_cls} classes: the top 5 always hold the answer)")
            lines = [head + f"{n_cls} classes",
                     f"  top-1 error          {m['top1_error']:.3f}  (accuracy {m['accuracy']:.3f}; always answering "
                     f"'{m['majority_class']}' would score {m['majority_accuracy']:.3f})",
                     f"  top-5 error          {top5}",
                     f"  balanced accuracy    {m['balanced_accuracy']:.3f}  (mean of the per-class recalls)",
                     f"  macro F1             {m['macro_f1']:.3f}",
                     f"  calibration error    {m['ece']:.3f}  (ECE, {m['n_bins']} bins: 0 = as often right as "
                     f"confident)"]
        return "\n".join([*(f"warning: {w}" for w in self.warnings), *lines, "",
                          self.per_class.to_string(index=False, float_format=lambda v: f"{v:.3f}"), "",
                          f"written to {self.folder}/: " + ", ".join(sorted(p.name for p in self.folder.iterdir()))])

    __str__ = to_string


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f6f4}
main{max-width:1240px;margin:0 auto;padding:20px 28px 60px;background:#fff}
h1{font-size:26px;margin:8px 0 2px}h2{font-size:20px;margin:34px 0 10px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin:20px 0 6px}.sub{color:#666;margin:0 0 14px}
.tiles{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.tile{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:150px;background:#fafafa}
.tile b{display:block;font-size:24px}.tile span{color:#666;font-size:13px}
.tile.bad{border-color:#c44e52;background:#fdf1f1}
ul.notes li{margin:4px 0}.warn{color:#a00000}
figure{margin:14px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:14px;margin:8px 0}
th,td{padding:3px 10px;border-bottom:1px solid #e4e4e4;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
td.bar{position:relative;min-width:120px}td.bar div{position:absolute;left:0;top:3px;bottom:3px;opacity:.35}
td.bar span{position:relative}
pre{background:#f4f4f4;padding:10px;overflow-x:auto;white-space:pre-wrap;font-size:12.5px;line-height:1.35}
details summary{cursor:pointer;font-weight:600;margin:8px 0}
"""


def write_report(run: str | Path | Run, evaluation: Evaluation | str | Path | None = None,
                 out: str | Path | None = None) -> Path:
    """Write the report of ``run`` (with ``evaluation``, default its newest ``eval-*`` folder) to ``out``
    (default ``RUN/report.html``, numbered if it exists; an existing ``out`` is never overwritten)."""
    run = run if isinstance(run, Run) else Run.open(run)
    if evaluation is None:
        evaluation = latest_evaluation(run)
    elif not isinstance(evaluation, Evaluation):
        evaluation = Evaluation.load(evaluation)
    out = _free_name(run.path / "report.html") if out is None else Path(out)
    with open(out, "x", encoding="utf-8") as f:
        f.write(render(run, evaluation))
    return out


def latest_evaluation(run: Run) -> Evaluation | None:
    """The newest evaluation folder of the run, if any."""
    found = sorted(run.path.glob("eval-*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return Evaluation.load(found[-1].parent) if found else None


def render(run: Run, evaluation: Evaluation | None = None) -> str:
    """The report as an HTML string."""
    ev, s, recipe, classes, items = evaluation, run.summary, run.recipe, run.classes, run.items
    title = f"{run.path.name}: {recipe.backbone.name} on {len(classes)} classes"
    sub = [f"recipe '{recipe.name}'", f"{s.get('epochs', '?')} epochs", f"{len(items)} images"]
    if s.get("best_score") is not None:
        sub.append(f"best {s.get('best_metric')} {s['best_score']:.3f}"
                   + (" (first fit: an honest validation estimate)" if "refit" in s else ""))
    if "refit" in s:
        sub.append(f"final model refit on train + val ({s['refit']['images']} images, {s['refit']['epochs']} epochs)")
    if s.get("wall_time_s") is not None:
        sub.append(f"{s['wall_time_s']:.0f} s training")
    parts = [f"<h1>{_e(title)}</h1>", f"<p class=sub>{_e(' · '.join(sub))}<br>{_e(str(run.path))}</p>",
             "<h2>At a glance</h2>"]
    if ev is not None and not ev.multilabel:
        parts += [_tiles(ev), _notes_list(notes(run, ev)), _picture(ev, "per_class.png"),
                  "<h3>Per class</h3>" + _per_class_table(ev.per_class) + _eval_heading(ev),
                  _picture(ev, "confusion.png") + _picture(ev, "calibration.png"),
                  _picture(ev, "wrong.png") + _cams(run, ev)]
    elif ev is not None:
        parts.append(_multilabel_section(ev))
    else:
        parts += [_notes_list(notes(run, ev)), "<p>No evaluation yet: <code>finetune evaluate " + _e(str(run.path))
                  + "</code> adds per-class results, the confusion matrix, calibration and the worst mistakes.</p>"]
    parts.append("<h2>Data</h2>")
    if recipe.train.labels == "multi":
        parts += [_picture(ev, "cooccurrence.png",
                           lambda: plots.cooccurrence(multilabel.matrix(items["label"], classes), classes)),
                  f"<pre>{_e(multilabel.counts_report(items, classes))}</pre>"]
    else:
        parts += [_picture(ev, "class_counts.png", lambda: plots.class_counts(items, classes)),
                  _table(counts_table(items, classes).reset_index())]
    groups = [g.name for g in run.plan.groups]
    parts += [_text_file(run.path / "data_report.txt", "Data report (bad files, image sizes)"),
              "<h2>Training</h2>", _picture(ev, "curves.png", lambda: plots.curves(plots.read_logs(run.path), groups)),
              _epoch_table(run), "<h2>Freeze plan</h2><p>What stayed fixed, what trained at which rate, and why:</p>",
              f"<pre>{_e(_read(run.path / 'plan.txt'))}</pre>", "<h2>Configuration</h2>",
              _text_file(run.path / "recipe.yaml", "recipe.yaml (the resolved recipe: click to open)"),
              f"<p class=sub>report written {time.strftime('%Y-%m-%d %H:%M')}</p>"]
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
            f"<body><main>\n" + "\n".join(parts) + "\n</main></body></html>\n")


def notes(run: Run, ev: Evaluation | None) -> list[str]:
    """Plain sentences (HTML) on class imbalance, what it did to the result, the worst class and calibration."""
    out = []
    train = run.items[run.items["split"] == "train"]["label"].value_counts().reindex(run.classes, fill_value=0)
    if len(train) >= 2 and train.max() > 0:
        hi, lo = train.idxmax(), train.idxmin()
        ratio = train[hi] / max(1, train[lo])
        if ratio >= 1.5:
            out.append(f"<b class=warn>Imbalanced training data:</b> {_e(hi)} has {train[hi]} images, {_e(lo)} "
                       f"{train[lo]} ({ratio:.1f}x fewer). Loss balancing in this run: "
                       f"<code>loss.balance: {_e(run.recipe.loss.balance)}</code>." + _plan_note(run, train[lo]))
        else:
            out.append(f"Training classes are balanced ({train.min()} to {train.max()} images a class).")
    if ev is None:
        return out
    out += [f"<b class=warn>{_e(w[0].upper() + w[1:])}.</b>" for w in ev.warnings]
    m, t = ev.metrics, ev.per_class
    gap = m["accuracy"] - m["balanced_accuracy"]
    out.append(f"Accuracy {m['accuracy']:.3f}; always answering <b>{_e(m['majority_class'])}</b> would score "
               f"{m['majority_accuracy']:.3f}. Balanced accuracy (mean recall over classes) is "
               f"{m['balanced_accuracy']:.3f}" + (f": {gap:.3f} lower, so the common classes carry the accuracy."
                                                   if gap > 0.03 else "."))
    worst = _weakest(t)
    if worst is not None:
        name, k = worst["class"], ev.classes.index(worst["class"])
        misses, false = ev.confusion[k].copy(), ev.confusion[:, k].copy()
        misses[k] = false[k] = 0
        if worst["recall"] <= worst["precision"] and misses.sum():
            j = int(np.argmax(misses))
            why = f"most of its misses ({misses[j]} of {misses.sum()}) are called {_e(ev.classes[j])}"
        elif false.sum():
            j = int(np.argmax(false))
            why = f"most of the wrong {_e(name)} calls ({false[j]} of {false.sum()}) are {_e(ev.classes[j])} images"
        else:
            why = ""
        called = (f"{worst['precision']:.0%} of the {worst['predicted']} images called {_e(name)} are {_e(name)}"
                  if worst["predicted"] else f"no image is called {_e(name)}")
        out.append(f"Weakest class (lowest F1): <b>{_e(name)}</b>. {worst['recall']:.0%} of its {worst['support']} "
                   f"images are found (recall) and {called} (precision)" + (f"; {why}." if why else "."))
    out.append(_calibration_note(run, m))
    return out


def _weakest(t: pd.DataFrame) -> pd.Series | None:
    """The class with the lowest F1 among those with images (ties: the lower recall)."""
    present = t[t["support"] > 0]
    return None if present.empty else present.sort_values(["f1", "recall"], kind="stable").iloc[0]


def _plan_note(run: Run, smallest: int) -> str:
    """The automatic freeze rule counts images a class on average; say so when the rarest class has far fewer."""
    n = run.plan.inputs
    mean = n["n_train"] / n["n_classes"] if n.get("n_classes") else 0
    return (f" The freeze plan was chosen for {mean:.0f} images a class on average; the rarest class has {smallest}."
            if n.get("n_classes") and mean >= 1.5 * smallest else "")


def _calibration_note(run: Run, m: dict) -> str:
    ece, acc, conf = m["ece"], m["accuracy"], m.get("mean_confidence")
    if ece < 0.05 or conf is None:
        return (f"Calibration error (ECE) {ece:.3f}: " + ("confidences match how often the model is right."
                                                          if ece < 0.05 else "see the reliability diagram."))
    if acc > conf:
        loss = run.recipe.loss
        causes = ([f"label smoothing ({loss.label_smoothing:g}) keeps confidences below 1"]
                  if loss.label_smoothing > 0 else [])
        if loss.balance == "weights":
            causes.append("the class-weighted loss moves probability towards the rare classes")
        return (f"<b>Underconfident</b> (ECE {ece:.3f}): right {acc:.0%} of the time, mean confidence {conf:.0%}"
                + (f"; in this run {' and '.join(causes)}." if causes else ".")
                + " Read its probabilities as a ranking, not as chances.")
    return (f"<b class=warn>Overconfident</b> (ECE {ece:.3f}): mean confidence {conf:.0%}, right {acc:.0%} of the "
            f"time: its probabilities overstate the chance of being right.")


def _tiles(ev: Evaluation) -> str:
    m, worst = ev.metrics, _weakest(ev.per_class)
    tiles = [(m["accuracy"], "accuracy", False),
             (m["majority_accuracy"], f"always answering '{m['majority_class']}'", False),
             (m["balanced_accuracy"], "balanced accuracy", m["accuracy"] - m["balanced_accuracy"] > 0.03)]
    if worst is not None:
        tiles.append((worst["f1"], f"F1 of {worst['class']} (weakest class)", worst["f1"] < 0.8))
    tiles += [(m["macro_f1"], "macro F1", False), (m["top1_error"], "top-1 error", False)]
    if m.get("top5_error") is not None:
        tiles.append((m["top5_error"], "top-5 error", False))
    tiles.append((m["ece"], "calibration error (ECE)", m["ece"] >= 0.1))
    return _tile_row(tiles)


def _tile_row(tiles: list[tuple[float, str, bool]]) -> str:
    """(value, label, highlighted) as a row of tiles, values to 3 decimals."""
    return "<div class=tiles>" + "".join(f"<div class='tile{' bad' if bad else ''}'><b>{v:.3f}</b><span>{_e(k)}"
                                         f"</span></div>" for v, k, bad in tiles) + "</div>"


def _multilabel_section(ev: Evaluation) -> str:
    """Tiles, notes, per-label pictures and table, and the largest errors of a multi-label evaluation."""
    m, t = ev.metrics, ev.per_class
    present = t[t["support"] > 0].sort_values("ap", kind="stable")
    tiles = [(m["map"], "mean average precision", False), (m["macro_f1"], "macro F1", False),
             (m["micro_f1"], "micro F1", False), (m["exact_match"], "exact label set", False)]
    notes = [f"<b class=warn>{_e(w[0].upper() + w[1:])}.</b>" for w in ev.warnings]
    if len(present):
        w = present.iloc[0]
        tiles.append((w["ap"], f"AP of {w['label']} (weakest label)", w["ap"] < 0.5))
        notes.append(f"Weakest label (lowest average precision): <b>{_e(w['label'])}</b>, AP {w['ap']:.3f} on "
                     f"{w['support']} images with it ({w['n_train']} in training); at its threshold "
                     f"{w['threshold']:.2f} it finds {w['recall']:.0%} of them, {w['precision']:.0%} of its calls right.")
    if m["labels_without_images"]:
        notes.append("No evaluated image carries " + ", ".join(map(_e, m["labels_without_images"])) +
                     ": their scores are left out of the means.")
    return (_tile_row(tiles) + _notes_list(notes) + _picture(ev, "per_label.png") + "<h3>Per label</h3>" + _table(t)
            + _eval_heading(ev) + _picture(ev, "pr_curves.png") + _picture(ev, "threshold_f1.png")
            + _picture(ev, "wrong.png"))


def _notes_list(notes: list[str]) -> str:
    return "<ul class=notes>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul>"


def _eval_heading(ev: Evaluation) -> str:
    return (f"<h2>Evaluation: {_e(ev.data)}, split {_e(ev.split)} ({ev.metrics['n']} images)</h2>"
            f"<p class=sub>checkpoint {_e(ev.checkpoint)}; files in {_e(str(ev.folder))}</p>")


def _per_class_table(t: pd.DataFrame) -> str:
    names = {"class": "class", "n_train": "train images", "support": "evaluated", "predicted": "predicted as",
             "precision": "precision", "recall": "recall", "f1": "F1"}
    return _table(t.reindex(columns=list(names), fill_value="").rename(columns=names),
                  bars=("precision", "recall", "F1"))


def _epoch_table(run: Run) -> str:
    df = run.metrics()
    if df.empty:
        return "<p>No training log.</p>"
    keep = [c for c in ("epoch", "train_loss_epoch", "train_acc", "train_f1", "val_loss", "val_acc", "val_recall",
                        "val_top5", "val_map", "val_f1")
            if c in df]
    df = df[keep].rename(columns={"epoch": "epochs done", "train_loss_epoch": "train_loss",
                                  "val_recall": "val_balanced_acc"})
    df["epochs done"] = df["epochs done"].astype(int) + 1  # as on the curves' x axis
    return _table(df, floats="{:.4f}")


def _picture(ev: Evaluation | None, name: str, make=None) -> str:
    """An evaluation's picture file inline, or one made now by ``make`` when there is no such file."""
    path = ev.pictures.get(name) if ev is not None else None
    if path is not None and Path(path).is_file():
        data = Path(path).read_bytes()
    elif make is not None:
        data = plots.png_bytes(make())
    else:
        return ""
    return _figure(data, {**PICTURES, **MULTILABEL_PICTURES}.get(name, name))


def _cams(run: Run, ev: Evaluation, n_wrong: int = 8, per_class: int = 2) -> str:
    """Grad-CAM maps of the predicted class on the most confident mistakes and correct images of each class, or a
    line on how to get them when grad-cam is not installed."""
    from .explain import Explainer
    from .predict import Predictor
    try:
        explainer = Explainer(Predictor.load(run.path / ev.checkpoint, device="cpu"))
    except ImportError as e:
        return f"<p>Maps of where the model looked: {_e(e)}; then evaluate again.</p>"
    p = pd.read_csv(ev.folder / "predictions.csv").sort_values("confidence", ascending=False, kind="stable")
    out = ""
    for rows, what in ((p[~p["correct"]].head(n_wrong), f"the {n_wrong} most confident mistakes"),
                       (p[p["correct"]].groupby("label").head(per_class), f"{per_class} correct images a class")):
        if rows.empty:
            continue
        pairs = explainer.overlays(rows["path"].tolist(), [ev.classes.index(c) for c in rows["predicted"]])
        fig = plots.image_grid([np.concatenate(pair, axis=1) for pair in pairs],
                               [f"true: {t}\npredicted: {q} ({c:.2f})" for t, q, c in
                                zip(rows["label"], rows["predicted"], rows["confidence"])], columns=4)
        out += _figure(plots.png_bytes(fig), f"Where the model looked, {what}: the image as the model read it, "
                                             f"then the Grad-CAM map of the predicted class (red: most evidence).")
    return out


def _figure(data: bytes, caption: str) -> str:
    return (f"<figure><img src='data:image/png;base64,{base64.b64encode(data).decode('ascii')}' alt='{_e(caption)}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(df: pd.DataFrame, floats: str = "{:.3f}", bars: tuple[str, ...] = ()) -> str:
    """``df`` as an HTML table; the scores in the ``bars`` columns drawn as bars from red (0) to green (1)."""
    def cell(column: str, v: object) -> str:
        if column in bars:
            return (f"<td class=bar><div style='width:{100 * v:.0f}%;background:hsl({120 * v:.0f},65%,45%)'></div>"
                    f"<span>{v:.3f}</span></td>")
        return f"<td>{_e(floats.format(v) if isinstance(v, float) else str(v))}</td>"

    head = "".join(f"<th>{_e(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(cell(c, v) for c, v in zip(df.columns, row)) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def _text_file(path: Path, title: str) -> str:
    return f"<details><summary>{_e(title)}</summary><pre>{_e(_read(path))}</pre></details>" if path.is_file() else ""


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else f"({path.name} is missing)"


def _free_name(path: Path) -> Path:
    for i in range(1, 10_000):
        p = path if i == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not p.exists():
            return p
    raise FileExistsError(f"no free file name for {path}")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
