"""End-to-end quality: the CLI with its defaults on real data, as a user would run it.

    HF_HUB_OFFLINE=1 nohup python benchmarks/quality.py > benchmarks/results/quality.log 2>&1 &

Runs each command below (unless its row is already in ``benchmarks/results/quality.csv``), reads the run's
summary.json and appends accuracy, macro recall (balanced accuracy) and wall time. The hymenoptera bar: validation
accuracy >= 0.90 after the default 5 epochs at 224 px.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATASETS, RESULTS, RUNS, append_row, cpu_name, log, read_rows, shown  # noqa: E402

OUT = RESULTS / "quality.csv"
COLUMNS = ["key", "command", "val_acc", "val_recall", "best_val_acc", "epochs", "fixed_depth", "wall_s",
           "passes", "run", "plan_hash", "schedule"]
#: key -> (arguments after `finetune train`, the bar on val_acc or None); the recipe overrides those arguments
#: stand for are in PLAN_ARGS (to predict the plan, which keys the row: a rule change reruns the case)
CASES = {
    # the defaults (no --recipe: the natural recipe, 224 px, tf_efficientnet_lite0, the automatic freeze plan), with
    # 5 epochs as the issue asks (natural.yaml itself now says 10)
    "hymenoptera-defaults-5ep": ([str(DATASETS / "hymenoptera"), "--epochs", "5"], 0.90),
    # microscopy recipe; its own default is 30 epochs at 224 px (2804 training images: hours on 2 shared cores),
    # so 5 epochs at 128 px here (the crops are 19-338 px, median well under 128)
    "bccd-microscopy-5ep-128px": ([str(DATASETS / "bccd_cells"), "--recipe", "microscopy", "--epochs", "5",
                                   "--image-size", "128"], None),
}


PLAN_ARGS = {
    "hymenoptera-defaults-5ep": ("hymenoptera", "natural", ["train.epochs=5"]),
    "bccd-microscopy-5ep-128px": ("bccd_cells", "microscopy", ["train.epochs=5", "image.size=128"]),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    a = ap.parse_args(argv)
    log(f"CPU: {cpu_name()}")
    # one intra-op thread: on the shared 2-core machine 2 threads ran 4x slower (see common.set_threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    from common import predict_plan
    for key in a.cases:
        ds, recipe, ov = PLAN_ARGS[key]
        want = predict_plan(ds, None, recipe, ov)
        if any(r["key"] == key and r.get("plan_hash") == want["plan_hash"] for r in read_rows(OUT)):
            continue
        args, bar = CASES[key]
        out = RUNS / "quality"
        name = f"{key}-{time.strftime('%Y%m%d-%H%M%S')}"
        cmd = ["finetune", "train", *args, "--out", str(out), "--name", name, "--no-progress"]
        written = (f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} HF_HUB_OFFLINE=1 finetune train "
                   + " ".join(shlex.quote(shown(x) if os.path.isabs(x) else x) for x in args))
        log(f"{key}: {written} (plan: depth {want['fixed_depth']}, {want['schedule']}, {want['plan_hash']})")
        t0 = time.time()
        p = subprocess.run(cmd, env=env, text=True, capture_output=True)
        wall = time.time() - t0
        if p.returncode:
            log(f"  FAILED ({p.returncode}): {p.stderr[-2000:]}")
            continue
        s = json.loads((out / name / "summary.json").read_text())
        plan = json.loads((out / name / "plan.json").read_text())
        from common import plan_summary
        from finetune.freeze import Plan
        m = s["final_metrics"]
        row = {"key": key, "command": written, "val_acc": round(m["val_acc"], 4), "val_recall": round(m["val_recall"], 4),
               "best_val_acc": round(s["best_score"], 4) if s.get("best_score") is not None else "",
               "epochs": s["epochs"], "fixed_depth": Plan.from_state_dict(plan).fixed_depth,
               "wall_s": round(wall, 1), "passes": "" if bar is None else ("yes" if m["val_acc"] >= bar else "NO"),
               "run": s["run"], **{k: plan_summary(plan)[k] for k in ("plan_hash", "schedule")}}
        append_row(OUT, row, COLUMNS)
        log(f"  val_acc {row['val_acc']} val_recall {row['val_recall']} {row['wall_s']}s")
    log("done")


if __name__ == "__main__":
    main()
