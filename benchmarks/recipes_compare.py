"""Natural vs microscopy recipe, same backbone (tf_efficientnet_lite0), size and epochs, on three real datasets.

    HF_HUB_OFFLINE=1 python benchmarks/recipes_compare.py --epochs 10 --per-class 10 100 --seeds 0 1
    python benchmarks/recipes_compare.py --summary

Each recipe runs as shipped (its reading, augmentation, loss balancing and its declared freeze domain, so the
automatic plan differs as the recipe says) with only image.size, train.epochs, batch size and workers overridden.
Training images: ``--per-class`` seeded images a class (all of a smaller class; several sizes allowed), one subset
per seed; validation: hymenoptera and bccd_cells their own val/ split (capped, stratified, see --val-cap),
mitocheck_cells a plate/well-grouped hold-out (no well on both sides). Rows append to
``benchmarks/results/recipes_compare.csv``; a rerun skips rows already there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, append_row, cpu_name, log, read_rows, run_fit, safe_name, set_threads, subset_csv  # noqa: E402

OUT = RESULTS / "recipes_compare.csv"
COLUMNS = ["dataset", "recipe", "per_class", "seed", "n_train", "n_val", "val_acc", "val_recall", "best_val_acc", "fixed_depth", "schedule",
           "epochs", "image_size", "wall_s", "run"]
DATASETS = ["hymenoptera", "bccd_cells", "mitocheck_cells"]
RECIPES = ["natural", "microscopy"]
#: mitocheck's files are 64x64: upsampling them costs 4x the CPU time for no new information
SIZES = {"hymenoptera": 128, "bccd_cells": 128, "mitocheck_cells": 64}


def main(argv=None) -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=DATASETS)
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=None, help="image size for every dataset (default: SIZES)")
    ap.add_argument("--per-class", type=int, nargs="+", default=[None],
                    help="training images a class, one or more sizes (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training subset and training seeds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--val-cap", type=int, default=600)
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT, help=f"result CSV (default: {OUT.relative_to(RESULTS.parents[1])})")
    a = ap.parse_args(argv)
    OUT = a.out
    if a.summary:
        print(summary(read_rows(OUT)))
        return
    set_threads(a.threads)
    log(f"CPU: {cpu_name()}")
    for ds in a.datasets:
        for per_class in a.per_class:
            for seed in a.seeds:
                for recipe in a.recipes:
                    one(ds, recipe, per_class, seed, a)
    log("done")


def one(ds: str, recipe: str, per_class: int | None, seed: int, a: argparse.Namespace) -> None:
    """Train one recipe on one subset, unless its row is already in the CSV."""
    csv_path, info = subset_csv(ds, per_class, val_cap=a.val_cap, seed=seed)
    size = a.size or SIZES[ds]
    key = {"dataset": ds, "recipe": recipe, "per_class": str(per_class or "all"), "seed": str(seed),
           "epochs": str(a.epochs), "image_size": str(size)}
    if any(all(r.get(k) == v for k, v in key.items()) for r in read_rows(OUT)):
        return
    ov = [f"image.size={size}", f"train.epochs={a.epochs}", "train.batch_size=32", "train.num_workers=0",
          f"train.seed={seed}"]
    log(f"{ds} {recipe} {per_class or 'all'} a class, seed {seed}: training ({info['n_train']} train, "
        f"{info['n_val']} val)")
    try:
        res = run_fit(ds, csv_path, recipe, ov, safe_name(f"rc-{ds}-{recipe}-{per_class}-s{seed}"))
    except Exception as e:
        log(f"  FAILED: {e!r}")
        return
    append_row(OUT, {**key, "n_train": info["n_train"], "n_val": info["n_val"], **res}, COLUMNS)
    log(f"  val_acc {res['val_acc']:.3f} val_recall {res['val_recall']:.3f} {res['wall_s']:.0f}s")


def summary(rows: list[dict]) -> str:
    """Mean over seeds of each (dataset, size, epochs, recipe), and the microscopy minus natural difference."""
    if not rows:
        return "(no rows yet)"
    import pandas as pd
    df = pd.DataFrame(rows).astype({"val_acc": float, "val_recall": float, "wall_s": float})
    keys = ["dataset", "per_class", "epochs", "image_size"]
    df["_d"] = df["dataset"].map({d: i for i, d in enumerate(DATASETS)})
    df["_n"] = pd.to_numeric(df["per_class"], errors="coerce").fillna(float("inf"))  # "all" last
    df = df.sort_values(["_d", "_n", "epochs"], kind="stable")
    lines = ["| dataset | images a class | epochs | recipe | auto plan: fixed depth, schedule | seeds | val_acc | "
             "val_recall | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for k, g in df.groupby(keys, sort=False):
        means = {}
        for recipe, r in g.groupby("recipe", sort=False):
            means[recipe] = r["val_acc"].mean(), r["val_recall"].mean()
            plans = ", ".join(sorted({f"{d}, {s}" for d, s in zip(r["fixed_depth"], r["schedule"])}))
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {recipe} | {plans} | {len(r)} | "
                         f"{means[recipe][0]:.3f} | {means[recipe][1]:.3f} | {r['wall_s'].mean():.0f} |")
        if {"natural", "microscopy"} <= set(means):
            dacc, drec = (m - n for m, n in zip(means["microscopy"], means["natural"]))
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | **microscopy - natural** | | | **{dacc:+.3f}** | "
                         f"**{drec:+.3f}** | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
