"""Multi-label on chula_smears (444 blood-smear photographs, 11 red-cell types): the automatic plan of the
histology recipe against a linear probe and full fine-tuning of the same backbone, epochs and split.

    HF_HUB_OFFLINE=1 python benchmarks/multilabel_chula.py --epochs 8 --size 160 --seeds 0
    python benchmarks/multilabel_chula.py --summary

Scores on the validation split (iteratively stratified, 20 %): mean average precision over labels (threshold
free) and macro / micro F1 at each label's threshold, which the run chose on that same split (so F1 is an
optimistic estimate; mAP is not affected). Rows go to benchmarks/results/multilabel_chula.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import DATASETS, RESULTS, append_row, log, read_rows, set_threads  # noqa: E402

OUT = RESULTS / "multilabel_chula.csv"
COLUMNS = ["plan", "seed", "epochs", "image_size", "fixed_depth", "schedule", "n_train", "n_val", "val_map",
           "macro_f1", "micro_f1", "wall_s", "run"]
PLANS = {"auto": [], "probe": ["freeze.mode=probe"], "full": ["freeze.mode=full"]}


def one(plan: str, seed: int, a: argparse.Namespace) -> None:
    from finetune import fit, multilabel
    from finetune.predict import Predictor

    key = {"plan": plan, "seed": str(seed), "epochs": str(a.epochs), "image_size": str(a.size)}
    if any(all(r.get(k) == v for k, v in key.items()) for r in read_rows(OUT)):
        return
    log(f"chula_smears {plan} seed {seed}: training")
    started = time.time()
    root = DATASETS / "chula_smears"
    run = fit(root, "histology", csv=root / "labels.csv", out=a.runs, name=f"chula-{plan}-s{seed}-{a.epochs}ep",
              progress=False, overrides=[f"train.epochs={a.epochs}", f"image.size={a.size}", f"train.seed={seed}",
                                         "train.num_workers=0", *PLANS[plan]])
    wall = time.time() - started
    items = run.items
    val = items[items["split"] == "val"]
    pred = Predictor.load(run.path)
    probs, _ = pred.probabilities(val["path"].tolist(), workers=0)
    target = torch.from_numpy(multilabel.matrix(val["label"], run.classes))
    metrics, _ = multilabel.score(probs, target, run.classes, pred.thresholds)
    p = run.plan
    append_row(OUT, {**key, "fixed_depth": p.fixed_depth, "schedule": p.schedule,
                     "n_train": int((items["split"] == "train").sum()), "n_val": len(val),
                     "val_map": round(metrics["map"], 4), "macro_f1": round(metrics["macro_f1"], 4),
                     "micro_f1": round(metrics["micro_f1"], 4), "wall_s": round(wall, 1), "run": run.path.name},
               COLUMNS)
    log(f"  mAP {metrics['map']:.3f} macro F1 {metrics['macro_f1']:.3f} ({wall:.0f} s)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", nargs="+", default=list(PLANS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/finetune_bench_runs"))
    ap.add_argument("--summary", action="store_true")
    a = ap.parse_args(argv)
    if a.summary:
        for r in read_rows(OUT):
            print(" | ".join(r[c] for c in COLUMNS[:-1]))
        return
    set_threads(a.threads)
    for seed in a.seeds:
        for plan in a.plans:
            one(plan, seed, a)


if __name__ == "__main__":
    main()
