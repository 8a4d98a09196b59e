"""Scan and start-up times on a large folder (benchmarks/make_many.py), measured in one run.

    check  DATA            finetune check, cold (empty FINETUNE_HOME) with --scan full and --scan header, then
                           warm (the scan cache filled by the full one); the ratio cold/warm
    first-step DATA REPO   seconds from calling fit() to the first training step, with the code of REPO (a
                           worktree: the code before the scan cache, or this one), twice over the same FINETUNE_HOME;
                           the breakdown from RUN/startup.json when the code writes one

Every command runs as a child process (``nice -n 5``) so that nothing is warm in memory but the OS page cache.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_STEP = '''
import sys, time, json
t0 = time.time()
import pytorch_lightning as pl
from finetune.train import fit

class Stop(pl.Callback):
    def on_train_batch_end(self, trainer, *a):
        print(json.dumps({"first_step_s": time.time() - t0}), flush=True)
        raise SystemExit(0)

fit(sys.argv[1], "natural", out=sys.argv[2], progress=False, callbacks=[Stop()],
    overrides=["train.epochs=1", "image.size=32", "train.batch_size=8", "train.num_workers=0"])
'''


def timed(cmd: list[str], env: dict, cwd: str | None = None) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (the command and every process it started) and its output."""
    t, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(["nice", "-n", "5", *cmd], env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        sys.exit(f"{cmd} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t, _children_cpu() - cpu, done.stdout


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def check(data: str) -> None:
    repo = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "FINETUNE_HOME": home, "PYTHONPATH": repo, "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "finetune.cli", "check", data]
        header = timed([*cmd, "--scan", "header"], env)
        for f in Path(home).glob("scan.sqlite*"):
            f.unlink()
        full = timed([*cmd, "--scan", "full"], env)
        warm = timed([*cmd, "--scan", "full"], env)
    row = {"data": data, "files": full[2].splitlines()[1]}
    for i, unit in ((0, "wall"), (1, "cpu")):
        row.update({f"cold_full_{unit}_s": round(full[i], 1), f"cold_header_{unit}_s": round(header[i], 1),
                    f"warm_{unit}_s": round(warm[i], 1), f"cold_full/warm {unit}": round(full[i] / warm[i], 1),
                    f"cold_header/warm {unit}": round(header[i] / warm[i], 1)})
    print(json.dumps({**row, "load": os.getloadavg()[0]}))


def first_step(data: str, repo: str, n_runs: int) -> None:
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as runs:
        env = {**os.environ, "FINETUNE_HOME": home, "PYTHONPATH": repo, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        script = Path(runs) / "first_step.py"
        script.write_text(FIRST_STEP)
        rows = []
        for attempt in ("first", "second")[:n_runs]:
            wall, cpu, out = timed([sys.executable, str(script), data, runs], env, cwd=runs)
            row = {"repo": repo, "run": attempt, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                   **json.loads(out.splitlines()[-1]), "load": os.getloadavg()[0]}
            startup = sorted(Path(runs).glob("*/startup.json"), key=os.path.getmtime)
            if startup and len(startup) == len(rows) + 1:
                row["startup"] = json.loads(startup[-1].read_text())
            rows.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["check", "first-step"])
    ap.add_argument("data")
    ap.add_argument("repo", nargs="?")
    ap.add_argument("--runs", type=int, default=2, help="first-step: runs over the same FINETUNE_HOME (1 or 2)")
    a = ap.parse_args()
    check(a.data) if a.what == "check" else first_step(a.data, a.repo, a.runs)
