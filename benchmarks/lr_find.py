"""The learning-rate finder against the recipe's rate: per data set, the rate ``optim.lr: find`` picks and the
validation accuracy of a short run with it and with the recipe's own rate (same subset, plan, seed).

    nice -n 5 python benchmarks/lr_find.py [--per-class 20] [--epochs 2] [--size 64] [--val-cap 100]

Appends rows to benchmarks/results/lr_find.csv (a rerun skips rows already there).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, append_row, log, read_rows, run_fit, set_threads, subset_csv

RECIPES = {"hymenoptera": "natural", "bccd_cells": "microscopy", "mitocheck_cells": "fluorescence"}
COLUMNS = ["dataset", "recipe", "per_class", "epochs", "size", "lr_mode", "lr", "val_acc", "val_recall", "wall_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=list(RECIPES))
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--val-cap", type=int, default=100)
    args = ap.parse_args()
    set_threads(1)
    out = RESULTS / "lr_find.csv"
    done = {(r["dataset"], r["per_class"], r["epochs"], r["size"], r["lr_mode"]) for r in read_rows(out)}
    for ds in args.datasets:
        csv_path, _ = subset_csv(ds, args.per_class, val_cap=args.val_cap)
        for mode in ("find", "recipe"):
            key = (ds, str(args.per_class), str(args.epochs), str(args.size), mode)
            if key in done:
                continue
            sets = [f"train.epochs={args.epochs}", f"image.size={args.size}"] + (["optim.lr=find"] if mode == "find" else [])
            log(f"{ds} lr={mode}")
            row = run_fit(ds, csv_path, RECIPES[ds], sets, f"lrfind-{ds}-{mode}")
            if mode == "find":
                lr = json.loads((Path(row["run"]) / "lr_find.json").read_text())["lr"]
            else:
                from finetune.recipe import load_recipe
                lr = load_recipe(RECIPES[ds]).optim.lr
            append_row(out, {"dataset": ds, "recipe": RECIPES[ds], "per_class": args.per_class, "epochs": args.epochs,
                             "size": args.size, "lr_mode": mode, "lr": f"{lr:.3g}", **row}, COLUMNS)


if __name__ == "__main__":
    main()
