"""Natural vs microscopy recipe, same backbone (tf_efficientnet_lite0), size and epochs, on three real datasets.

    HF_HUB_OFFLINE=1 nohup python benchmarks/recipes_compare.py > benchmarks/results/recipes_compare.log 2>&1 &
    python benchmarks/recipes_compare.py --summary

Each recipe runs as shipped (its reading, augmentation, loss balancing and its declared freeze domain, so the
automatic plan differs as the recipe says) with only image.size, train.epochs, batch size and workers overridden.
Full training sets; validation: hymenoptera and bccd_cells their own val/ split (capped, stratified, see --val-cap),
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
COLUMNS = ["dataset", "recipe", "n_train", "n_val", "val_acc", "val_recall", "best_val_acc", "fixed_depth", "schedule",
           "epochs", "image_size", "wall_s", "run"]
DATASETS = ["hymenoptera", "bccd_cells", "mitocheck_cells"]
RECIPES = ["natural", "microscopy"]
#: mitocheck's files are 64x64: upsampling them costs 4x the CPU time for no new information
SIZES = {"hymenoptera": 128, "bccd_cells": 128, "mitocheck_cells": 64}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=DATASETS)
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=None, help="image size for every dataset (default: SIZES)")
    ap.add_argument("--per-class", type=int, default=None, help="cap the training images a class (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--val-cap", type=int, default=600)
    ap.add_argument("--summary", action="store_true")
    a = ap.parse_args(argv)
    if a.summary:
        print(summary(read_rows(OUT)))
        return
    set_threads(a.threads)
    log(f"CPU: {cpu_name()}")
    for ds in a.datasets:
        csv_path, info = subset_csv(ds, a.per_class, val_cap=a.val_cap)
        size = a.size or SIZES[ds]
        for recipe in a.recipes:
            if any(r["dataset"] == ds and r["recipe"] == recipe and r["epochs"] == str(a.epochs)
                   and r["image_size"] == str(size) and r["n_train"] == str(info["n_train"]) for r in read_rows(OUT)):
                continue
            ov = [f"image.size={size}", f"train.epochs={a.epochs}", "train.batch_size=32", "train.num_workers=0",
                  "train.seed=0"]
            log(f"{ds} {recipe}: training ({info['n_train']} train, {info['n_val']} val)")
            try:
                res = run_fit(ds, csv_path, recipe, ov, safe_name(f"rc-{ds}-{recipe}"))
            except Exception as e:
                log(f"  FAILED: {e!r}")
                continue
            row = {"dataset": ds, "recipe": recipe, "n_train": info["n_train"], "n_val": info["n_val"],
                   "epochs": a.epochs, "image_size": size, **res}
            append_row(OUT, row, COLUMNS)
            log(f"  val_acc {res['val_acc']:.3f} val_recall {res['val_recall']:.3f} {res['wall_s']:.0f}s")
    log("done")


def summary(rows: list[dict]) -> str:
    if not rows:
        return "(no rows yet)"
    lines = ["| dataset | recipe | train / val images | auto plan: fixed depth, schedule | val_acc | val_recall | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['recipe']} | {r['n_train']} / {r['n_val']} | {r['fixed_depth']}, "
                     f"{r['schedule']} | {float(r['val_acc']):.3f} | {float(r['val_recall']):.3f} | {r['wall_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
