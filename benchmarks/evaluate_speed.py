"""Images per second of evaluation's prediction phase: the per-image loop in the main process that
``Predictor.probabilities`` used to be (reproduced below as the baseline) against the DataLoader path with 0, 1 and
2 worker processes, on the same run and images, interleaved round by round in one process.

    nice -n 5 python benchmarks/evaluate_speed.py RUN [--data ../shared/datasets/bccd_cells] [--split test]

RUN is a trained run folder (any accuracy will do). Reading alone (files to tensors in the main process) and the
network alone (on batches already in memory) are timed too: their shares of the loop bound what worker processes
can hide when there are free cores. What is timed is the part of ``finetune evaluate`` that
changed: reading, intensity scaling, resizing and the network, from file names to the (N, classes) matrix; the
metrics, pictures and report after it are the same code before and after.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("FINETUNE_DATASETS", ROOT.parent / "shared" / "datasets"))

import torch  # noqa: E402

from finetune.data import default_workers  # noqa: E402
from finetune.evaluate import select_items  # noqa: E402
from finetune.predict import Predictor  # noqa: E402
from finetune.run import Run  # noqa: E402


def per_image_loop(pred: Predictor, files: list[str], batch_size: int) -> torch.Tensor:
    """The old ``Predictor.probabilities``: every file decoded in a Python loop in the main process."""
    out = [pred.predict(torch.stack([pred.preprocess.load(f, pred.transform) for f in files[i:i + batch_size]]))
           for i in range(0, len(files), batch_size)]
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--data", default=str(DATASETS / "bccd_cells"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=64, help="as finetune evaluate's default")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = Run.open(a.run)
    items, name, split, bad = select_items(run, a.data, split=a.split)
    files = items["path"].tolist()
    pred = Predictor.load(run.path, device="cpu" if not torch.cuda.is_available() else None)
    print(f"{platform.node()}: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
          f"{len(files)} images of {name} ({split}), backbone {run.recipe.backbone.name}, "
          f"input {list(pred.preprocess.config['input_size'])}, batch {a.batch_size}, {a.threads} thread(s), "
          f"default_workers() = {default_workers()}")

    reference = per_image_loop(pred, files, a.batch_size)  # warm-up, and the numbers the new path must give
    batches = [torch.stack([pred.preprocess.load(f, pred.transform) for f in files[i:i + a.batch_size]])
               for i in range(0, len(files), a.batch_size)]
    times: dict[str, list[float]] = {"loop": []} | {f"loader, {w} workers": [] for w in a.workers}
    parts: dict[str, list[float]] = {"reading alone": [], "network alone": []}
    for r in range(a.rounds):
        start = time.perf_counter()
        [pred.preprocess.load(f, pred.transform) for f in files]
        parts["reading alone"].append(time.perf_counter() - start)
        start = time.perf_counter()
        [pred.predict(x) for x in batches]
        parts["network alone"].append(time.perf_counter() - start)
        for key in times:
            start = time.perf_counter()
            if key == "loop":
                probs = per_image_loop(pred, files, a.batch_size)
            else:
                probs, errors = pred.probabilities(files, batch_size=a.batch_size, workers=int(key.split()[1]))
                assert not errors
            times[key].append(time.perf_counter() - start)
            diff = float((probs - reference).abs().max())
            assert diff < 1e-5, f"{key} differs from the loop by {diff}"
        print(f"round {r + 1}: " + ", ".join(f"{k} {len(files) / t[-1]:.1f} img/s" for k, t in times.items()),
              flush=True)

    base = times["loop"]
    print("\n| path | images/s (median of rounds) | speed-up against the loop (median of per-round ratios) |")
    print("|:---|---:|---:|")
    for key, t in times.items():
        ratios = [b / x for b, x in zip(base, t)]
        print(f"| {key} | {len(files) / statistics.median(t):.1f} | **{statistics.median(ratios):.2f}** "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")
    for key, t in parts.items():
        share = [x / b for x, b in zip(t, base)]
        print(f"| {key} (share of the loop's time) | {len(files) / statistics.median(t):.1f} | "
              f"{statistics.median(share):.2f} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; every path gave the loop's probabilities within 1e-5")


if __name__ == "__main__":
    main()
