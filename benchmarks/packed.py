"""Training from a packed copy of bccd_cells against training from its folder: the same seed and recipe, one
process; then a 2-process DDP run (CPU, gloo) from the packed copy. Validation accuracy and training images/s
(the training epochs' wall time, validation excluded; and per CPU second of the training process, which other jobs
on a shared machine do not change), all in one run.

    nice -n 5 python benchmarks/packed.py --epochs 1 --size 64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATASETS

import pytorch_lightning as pl  # noqa: E402

from finetune import fit  # noqa: E402
from finetune.pack import pack  # noqa: E402
from finetune.recipe import load_recipe  # noqa: E402

DDP = '''
import sys
from finetune import fit
if __name__ == "__main__":
    fit(sys.argv[1], "natural", out=sys.argv[2], name="ddp", progress=False, overrides=sys.argv[3:])
'''


class Throughput(pl.Callback):
    """Training images and seconds of the training epochs (validation excluded)."""

    def __init__(self):
        self.images, self.seconds, self.cpu = 0, 0.0, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.t, self.c = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[1])

    def on_validation_epoch_start(self, trainer, pl_module):
        self.seconds += time.perf_counter() - self.t
        self.cpu += time.process_time() - self.c  # this process's CPU (loader workers: 0 on 2 cores): load-proof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="bccd_cells")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--work", default=None, help="folder for the packed copy and the runs (default: a temporary one)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="ft-packed-"))
    data = DATASETS / a.dataset
    overrides = [f"train.epochs={a.epochs}", f"image.size={a.size}", "train.batch_size=32", "train.seed=0"]
    t = time.perf_counter()
    dest = pack(data, load_recipe("natural").override(overrides), str(work / "packed")).url
    pack_s = time.perf_counter() - t
    rows = {}
    for name, source in (("folder", data), ("packed", dest)):
        speed = Throughput()
        run = fit(source, "natural", out=work / "runs", name=name, progress=False, overrides=overrides,
                  callbacks=[speed])
        rows[name] = {"val_acc": run.summary["final_metrics"]["val_acc"], "images": speed.images,
                      "images_per_s": round(speed.images / speed.seconds, 1),
                      "images_per_cpu_s": round(speed.images / speed.cpu, 1),
                      "to_first_step_s": run.read_json("startup.json")["to_first_step_s"]}
        print(json.dumps({name: rows[name]}), flush=True)
    script = work / "ddp.py"
    script.write_text(DDP)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), dest, str(work / "runs"), *overrides, "train.accelerator=cpu",
                           "train.devices=2", "train.strategy=ddp"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    ddp = json.loads((work / "runs" / "ddp" / "summary.json").read_text())
    rows["packed_ddp2"] = {"val_acc": ddp["final_metrics"]["val_acc"], "wall_s": round(time.perf_counter() - t, 1)}
    print(json.dumps({"dataset": a.dataset, "pack_s": round(pack_s, 1), **rows,
                      "packed/folder images_per_s": round(rows["packed"]["images_per_s"]
                                                          / rows["folder"]["images_per_s"], 2),
                      "packed/folder images_per_cpu_s": round(rows["packed"]["images_per_cpu_s"]
                                                              / rows["folder"]["images_per_cpu_s"], 2),
                      "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
