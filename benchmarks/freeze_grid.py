"""Freeze-policy grid: every fixed depth (0 = full fine-tuning ... n = linear probe) and the automatic plan, on three
real datasets at two training-set sizes; only the freeze settings differ between rows of one task.

    HF_HUB_OFFLINE=1 nohup python benchmarks/freeze_grid.py > benchmarks/results/freeze_grid.log 2>&1 &
    python benchmarks/freeze_grid.py --summary          # markdown summary of benchmarks/results/freeze_grid.csv

Rows are appended to ``benchmarks/results/freeze_grid.csv`` as each training finishes; a rerun skips rows already
there. Fixed-depth rows are keyed by (dataset, per_class, depth); automatic rows by the plan the rule makes now
(fixed depth, schedule and a hash of every group's start epoch, lr multiplier and BN mode), so after a change to
``finetune/freeze.py`` only the automatic rows whose plan changed are trained again.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULTS, append_row, cpu_name, log, predict_plan, read_rows, run_fit, safe_name,  # noqa: E402
                    set_threads, subset_csv)

OUT = RESULTS / "freeze_grid.csv"
COLUMNS = ["dataset", "recipe", "per_class", "n_train", "n_val", "plan", "fixed_depth", "schedule", "plan_hash",
           "distance", "val_acc", "val_recall", "best_val_acc", "wall_s", "epochs", "image_size", "run"]
#: dataset -> the recipe it is trained with (its declared domain is the recipe's freeze.domain)
TASKS = {"hymenoptera": "natural", "bccd_cells": "microscopy", "mitocheck_cells": "fluorescence"}
N_GROUPS = 8  # tf_efficientnet_lite0: finetune.freeze.n_body_groups


def settings(epochs: int, size: int, batch: int) -> list[str]:
    return [f"image.size={size}", f"train.epochs={epochs}", f"train.batch_size={batch}", "train.num_workers=0",
            "train.seed=0"]


def plans(measure: bool) -> list[tuple[str, list[str]]]:
    out = [(f"fixed{d}", ["freeze.mode=fixed", f"freeze.depth={d}"]) for d in range(N_GROUPS + 1)]
    out.append(("auto", ["freeze.mode=auto"]))
    if measure:
        out.append(("auto-measure", ["freeze.mode=auto", "freeze.domain=measure"]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(TASKS))
    ap.add_argument("--per-class", nargs="+", type=int, default=[10, 100])
    ap.add_argument("--plans", nargs="+", default=None, help="subset of plan names (fixed0..fixed8, auto, auto-measure)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--val-cap", type=int, default=300)
    ap.add_argument("--no-measure", action="store_true", help="skip auto with freeze.domain=measure")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--summary", action="store_true", help="print the markdown summary and exit")
    a = ap.parse_args(argv)
    if a.summary:
        print(summary(read_rows(a.out)))
        return
    set_threads(2)
    log(f"CPU: {cpu_name()}; results -> {a.out}")
    for per_class in a.per_class:  # every task at 10 a class first: the cheap rows give the first answer early
        for ds in a.datasets:
            recipe = TASKS[ds]
            csv_path, info = subset_csv(ds, per_class, val_cap=a.val_cap)
            for plan_name, extra in plans(not a.no_measure):
                if a.plans and plan_name not in a.plans:
                    continue
                ov = settings(a.epochs, a.size, a.batch) + extra
                done = [r for r in read_rows(a.out) if r["dataset"] == ds and r["per_class"] == str(per_class)
                        and r["plan"] == plan_name and r["epochs"] == str(a.epochs) and r["image_size"] == str(a.size)]
                if plan_name.startswith("auto"):
                    try:
                        want = predict_plan(ds, csv_path, recipe, ov)
                    except Exception as e:  # e.g. the measured domain failing: record nothing, go on
                        log(f"{ds} {per_class}/class {plan_name}: cannot make the plan: {e!r}")
                        continue
                    done = [r for r in done if r["plan_hash"] == want["plan_hash"]]
                    note = f" (plan: depth {want['fixed_depth']}, {want['schedule']}, {want['plan_hash']})"
                else:
                    note = ""
                if done:
                    continue
                log(f"{ds} {per_class}/class {plan_name}{note}: training ({info['n_train']} train, {info['n_val']} val)")
                try:
                    res = run_fit(ds, csv_path, recipe, ov, safe_name(f"fg-{ds}-{per_class}-{plan_name}"))
                except Exception as e:
                    log(f"  FAILED: {e!r}")
                    continue
                row = {"dataset": ds, "recipe": recipe, "per_class": per_class, "n_train": info["n_train"],
                       "n_val": info["n_val"], "plan": plan_name, "epochs": a.epochs, "image_size": a.size, **res}
                append_row(a.out, row, COLUMNS)
                log(f"  val_acc {res['val_acc']:.3f} val_recall {res['val_recall']:.3f} depth {res['fixed_depth']} "
                    f"{res['wall_s']:.0f}s")
    log("done")


# -- summary -----------------------------------------------------------------------------------------------------
def _latest(rows: list[dict]) -> dict:
    """Last row per (dataset, per_class, plan): a rerun of auto after a rule change replaces the older row."""
    out = {}
    for r in rows:
        out[(r["dataset"], int(r["per_class"]), r["plan"])] = r
    return out


def summary(rows: list[dict]) -> str:
    if not rows:
        return "(no rows yet)"
    by = _latest(rows)
    tasks = sorted({(d, p) for d, p, _ in by}, key=lambda t: (list(TASKS).index(t[0]) if t[0] in TASKS else 9, t[1]))
    f = lambda r, k: float(r[k])  # noqa: E731
    lines = ["| dataset | per class | best fixed depth (acc / recall) | auto: depth (acc / recall) | auto - best (acc) "
             "| auto within 2 pt | full (0) | probe (8) | auto-measure: depth (acc / recall) | fixed depths done |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    wins = {"full": [], "probe": [], "both": []}
    for ds, pc in tasks:
        fixed = {int(p[5:]): r for (d, c, p), r in by.items() if d == ds and c == pc and p.startswith("fixed")}
        auto, meas = by.get((ds, pc, "auto")), by.get((ds, pc, "auto-measure"))
        cell = lambda r: f"{f(r, 'val_acc'):.3f} / {f(r, 'val_recall'):.3f}" if r else "-"  # noqa: E731
        best_d = max(fixed, key=lambda d: (f(fixed[d], "val_acc"), f(fixed[d], "val_recall"))) if fixed else None
        best = fixed.get(best_d)
        gap = f(auto, "val_acc") - f(best, "val_acc") if auto and best else None
        lines.append(
            f"| {ds} | {pc} | {best_d} ({cell(best)}) | {auto['fixed_depth'] + ' (' + cell(auto) + ')' if auto else '-'} "
            f"| {f'{100 * gap:+.1f} pt' if gap is not None else '-'} | {('yes' if gap >= -0.02 else '**no**') if gap is not None else '-'} "
            f"| {cell(fixed.get(0))} | {cell(fixed.get(N_GROUPS))} "
            f"| {meas['fixed_depth'] + ' (' + cell(meas) + ')' if meas else '-'} | {len(fixed)}/{N_GROUPS + 1} |")
        if auto and 0 in fixed and N_GROUPS in fixed:
            a_ = f(auto, "val_acc")
            wins["full"].append(a_ - f(fixed[0], "val_acc"))
            wins["probe"].append(a_ - f(fixed[N_GROUPS], "val_acc"))
            wins["both"].append(a_ - max(f(fixed[0], "val_acc"), f(fixed[N_GROUPS], "val_acc")))
    if wins["full"]:
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        lines += ["", f"Over {len(wins['full'])} tasks, auto minus full fine-tuning: {100 * mean(wins['full']):+.1f} pt "
                  f"val_acc on average; auto minus linear probe: {100 * mean(wins['probe']):+.1f} pt; auto minus the "
                  f"better extreme of each task: {100 * mean(wins['both']):+.1f} pt "
                  f"(auto beats both extremes on {sum(w > 0 for w in wins['both'])} of {len(wins['both'])} tasks)."]
    lines += ["", "Every row (val_acc / val_recall, depth 0 = full fine-tuning, 8 = linear probe):", ""]
    names = [f"fixed{d}" for d in range(N_GROUPS + 1)] + ["auto", "auto-measure"]
    lines.append("| dataset | per class | " + " | ".join(n.replace("fixed", "") for n in names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for ds, pc in tasks:
        cells = []
        for n in names:
            r = by.get((ds, pc, n))
            cells.append(f"{f(r, 'val_acc'):.2f} / {f(r, 'val_recall'):.2f}" if r else "-")
        lines.append(f"| {ds} | {pc} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
