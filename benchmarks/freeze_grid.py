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
                    set_threads, shown, subset_csv)

OUT = RESULTS / "freeze_grid.csv"
COLUMNS = ["dataset", "recipe", "per_class", "n_train", "n_val", "plan", "fixed_depth", "schedule", "plan_hash",
           "distance", "val_acc", "val_recall", "best_val_acc", "wall_s", "epochs", "image_size", "run", "seed"]
#: dataset -> the recipe it is trained with (its declared domain is the recipe's freeze.domain)
TASKS = {"hymenoptera": "natural", "bccd_cells": "microscopy", "mitocheck_cells": "fluorescence"}
N_GROUPS = 8  # tf_efficientnet_lite0: finetune.freeze.n_body_groups
#: image size per dataset (same for every row of a task): mitocheck's files are 64x64, and upsampling them to 112
#: would cost 3x the CPU time for no new information (the reduction that makes its 100-a-class rows affordable)
SIZES = {"hymenoptera": 112, "bccd_cells": 112, "mitocheck_cells": 64}
#: the order the plans run in: extremes and auto first, so a partial grid still answers "auto vs the extremes"
ORDER = [0, N_GROUPS, "auto", 4, 6, 2, 7, 5, 3, 1]


def settings(epochs: int, size: int, batch: int, seed: int = 0) -> list[str]:
    return [f"image.size={size}", f"train.epochs={epochs}", f"train.batch_size={batch}", "train.num_workers=0",
            f"train.seed={seed}"]


def _seed(r: dict) -> int:
    return int(r.get("seed") or 0)  # rows written before the seed column existed are seed 0


def _migrate(path: Path) -> None:
    """Add columns this version writes (at the end) to an existing CSV's header."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    head = lines[0].strip().split(",")
    if lines and head != COLUMNS and COLUMNS[:len(head)] == head:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(",".join(COLUMNS) + "\n" + "".join(lines[1:]))
        tmp.replace(path)


def plans() -> list[tuple[str, list[str]]]:
    return [("auto", ["freeze.mode=auto"]) if d == "auto" else (f"fixed{d}", ["freeze.mode=fixed", f"freeze.depth={d}"])
            for d in ORDER]


MEASURE = ("auto-measure", ["freeze.mode=auto", "freeze.domain=measure"])
#: diagnostic variants (--variants): which part of the automatic plan costs accuracy, and candidate rule fixes
#: (a variant whose plan equals the automatic plan's is skipped: it would repeat the auto row)
VARIANTS = [
    ("auto+bn=frozen", ["freeze.mode=auto", "freeze.bn=frozen"]),        # BN keeps ImageNet's statistics everywhere
    ("auto+bn=train", ["freeze.mode=auto", "freeze.bn=train"]),          # BN follows the batches everywhere
    ("fixed0+bn=frozen", ["freeze.mode=fixed", "freeze.depth=0", "freeze.bn=frozen"]),
    ("auto+schedule=none", ["freeze.mode=auto", "freeze.schedule=none"]),  # no linear-probe phase
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(TASKS))
    ap.add_argument("--per-class", nargs="+", type=int, default=[10, 100])
    ap.add_argument("--plans", nargs="+", default=None, help="subset of plan names (fixed0..fixed8, auto, auto-measure)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="training-subset and training seeds (the validation subset is the same for all)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=None, help="image size for every dataset (default: SIZES)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--val-cap", type=int, default=300)
    ap.add_argument("--measure", action="store_true", help="only the auto rows with freeze.domain=measure")
    ap.add_argument("--variants", action="store_true", help="only the diagnostic variants (VARIANTS)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--summary", action="store_true", help="print the markdown summary and exit")
    a = ap.parse_args(argv)
    if a.summary:
        print(summary(read_rows(a.out)))
        return
    set_threads(a.threads)
    _migrate(a.out)
    log(f"CPU: {cpu_name()}; {a.threads} thread(s); results -> {shown(a.out)}")
    for seed, per_class, ds in [(s, p, d) for s in a.seeds for p in a.per_class for d in a.datasets]:
        # every task at 10 a class first: the cheap rows give the first answer early
        recipe = TASKS[ds]
        csv_path, info = subset_csv(ds, per_class, val_cap=a.val_cap, seed=seed)
        size = a.size or SIZES[ds]
        todo = [MEASURE] if a.measure else VARIANTS if a.variants else plans()
        for plan_name, extra in todo:
            if a.plans and plan_name not in a.plans:
                continue
            ov = settings(a.epochs, size, a.batch, seed) + extra
            done = [r for r in read_rows(a.out) if r["dataset"] == ds and r["per_class"] == str(per_class)
                    and _seed(r) == seed
                    and r["plan"] == plan_name and r["epochs"] == str(a.epochs) and r["image_size"] == str(size)]
            # every row is keyed by the plan the code makes now (fixed plans' BatchNorm modes depend on the
            # data since the BN policy change), so a rule change reruns exactly the rows whose plan changed
            try:
                want = predict_plan(ds, csv_path, recipe, ov)
            except Exception as e:  # e.g. the measured domain failing: record nothing, go on
                log(f"{ds} {per_class}/class {plan_name}: cannot make the plan: {e!r}")
                continue
            done = [r for r in done if r["plan_hash"] == want["plan_hash"]]
            note = f" (plan: depth {want['fixed_depth']}, {want['schedule']}, {want['plan_hash']})"
            if a.variants and plan_name != "auto":
                auto_plan = predict_plan(ds, csv_path, recipe, settings(a.epochs, size, a.batch, seed)
                                         + ["freeze.mode=auto"])
                if auto_plan["plan_hash"] == want["plan_hash"]:
                    log(f"{ds} {per_class}/class {plan_name}: same plan as auto, skipped")
                    continue
            if done:
                continue
            log(f"{ds} {per_class}/class seed {seed} {plan_name}{note}: training ({info['n_train']} train, {info['n_val']} val)")
            try:
                res = run_fit(ds, csv_path, recipe, ov, safe_name(f"fg-{ds}-{per_class}-s{seed}-{plan_name}"))
            except Exception as e:
                log(f"  FAILED: {e!r}")
                continue
            row = {"dataset": ds, "recipe": recipe, "per_class": per_class, "n_train": info["n_train"],
                   "n_val": info["n_val"], "plan": plan_name, "epochs": a.epochs, "image_size": size, "seed": seed, **res}
            append_row(a.out, row, COLUMNS)
            log(f"  val_acc {res['val_acc']:.3f} val_recall {res['val_recall']:.3f} depth {res['fixed_depth']} "
                f"{res['wall_s']:.0f}s")
    log("done")


# -- summary -----------------------------------------------------------------------------------------------------
def _latest(rows: list[dict]) -> dict:
    """(dataset, per_class, plan) -> {'val_acc', 'val_recall' (means over seeds), 'n', 'fixed_depth', ...}.

    Per seed the last row counts (a rerun after a rule change replaces the older row); rows count only when they
    carry the plan hash of the newest row of their task and plan name, so two rules are never averaged."""
    last = {}
    for r in rows:
        last[(r["dataset"], int(r["per_class"]), r["plan"], _seed(r))] = r
    newest_hash = {}
    for r in rows:  # the newest row in file order decides the current rule's plan
        newest_hash[(r["dataset"], int(r["per_class"]), r["plan"])] = r["plan_hash"]
    groups: dict = {}
    for (d, c, p, _), r in last.items():
        if r["plan_hash"] != newest_hash[(d, c, p)]:
            continue
        groups.setdefault((d, c, p), []).append(r)
    out = {}
    for k, rs in groups.items():
        out[k] = {**rs[-1], "n": len(rs), "val_acc": sum(float(r["val_acc"]) for r in rs) / len(rs),
                  "val_recall": sum(float(r["val_recall"]) for r in rs) / len(rs)}
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
        fixed = {int(p[5:]): r for (d, c, p), r in by.items() if d == ds and c == pc and p.startswith("fixed") and p[5:].isdigit()}
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
    seeds = sorted({r["n"] for r in by.values()})
    lines += ["", f"Seeds averaged per cell: {', '.join(map(str, seeds))}.", "",
              "Every row (val_acc / val_recall, depth 0 = full fine-tuning, 8 = linear probe):", ""]
    names = [f"fixed{d}" for d in range(N_GROUPS + 1)] + ["auto", "auto-measure"]
    variants = [n for n, _ in VARIANTS if any(p == n for _, _, p in by)]
    lines.append("| dataset | per class | " + " | ".join(n.replace("fixed", "") for n in names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for ds, pc in tasks:
        cells = []
        for n in names:
            r = by.get((ds, pc, n))
            cells.append(f"{f(r, 'val_acc'):.2f} / {f(r, 'val_recall'):.2f}" if r else "-")
        lines.append(f"| {ds} | {pc} | " + " | ".join(cells) + " |")
    if variants:
        lines += ["", "Diagnostic variants (val_acc / val_recall; fixed depth of the plan):", "",
                  "| dataset | per class | auto | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
        for ds, pc in tasks:
            cells = []
            for n in ["auto"] + variants:
                r = by.get((ds, pc, n))
                cells.append(f"{f(r, 'val_acc'):.2f} / {f(r, 'val_recall'):.2f} (d{r['fixed_depth']})" if r else "-")
            lines.append(f"| {ds} | {pc} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
