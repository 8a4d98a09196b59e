"""The GPU parts of benchmarks/gpu_check.sh: training throughput against a bare timm loop, and a 2-device DDP run.

``throughput``: images per second training the default backbone at 224 px in bf16, measured two ways in one run
on the same card: (1) a bare timm + torch loop on synthetic batches already on the device, the loop of timm's
``benchmark.py --bench train`` (SGD at lr 1e-4, cross-entropy, autocast; its file is not in timm's wheel and the GPU
machine has no network, so it is written out here); (2) ``finetune.fit`` on a folder of JPEG files (loader workers,
augmentation, Lightning), every weight training (``freeze.mode=full``). For (2) the wall rate counts the whole
step including any wait for data; the compute rate counts only the time between a batch's start and end.

``ddp``: ``finetune.fit`` with ``train.devices=2 train.strategy=ddp``; Lightning starts the second process by
running this script again. ``--cpu-dry-run`` runs both on the CPU with tiny sizes (gloo for DDP), in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune import fit  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"


def image_folder(root: Path, n_train: int, n_val: int, size: int, seed: int = 0) -> Path:
    """Two classes of smooth random JPEGs (low-frequency noise, photo-like to decode), in train/ and val/."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            label = "a" if i % 2 else "b"
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def bare_timm_loop(device: str, size: int, batch: int, warmup: int, steps: int) -> float:
    """Images per second of timm's benchmark.py training loop: synthetic batches on the device, bf16 autocast."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, num_classes=1000).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


class StepTimer(pl.Callback):
    """Train-batch timings of the first epoch after ``warmup`` batches: wall (batch to batch, data waits included)
    and compute (batch start to batch end, device synchronised at both)."""

    def __init__(self, warmup: int):
        self.warmup, self.compute, self.images, self.first, self.last, self._t = warmup, 0.0, 0, None, None, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx >= self.warmup:
            _sync(pl_module.device.type)
            self._t = time.perf_counter()
            self.first = self.first or self._t

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx >= self.warmup:
            _sync(pl_module.device.type)
            self.last = time.perf_counter()
            self.compute += self.last - self._t
            self.images += len(batch[1])


def finetune_fit(data: Path, out: Path, accelerator: str, size: int, batch: int, warmup: int) -> dict:
    timer = StepTimer(warmup)
    run = fit(data, "natural", out=out, name="throughput", progress=False, callbacks=[timer],
              overrides=[f"train.accelerator={accelerator}", "train.devices=1", "train.precision=bf16-mixed",
                         f"image.size={size}", f"train.batch_size={batch}", "train.epochs=1", "freeze.mode=full"])
    wall = timer.last - timer.first
    return {"wall": timer.images / wall, "compute": timer.images / timer.compute, "images": timer.images,
            "run": str(run.path)}


def throughput(a: argparse.Namespace) -> None:
    dry = a.cpu_dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        sys.exit("throughput: no CUDA device (use --cpu-dry-run to exercise the code on the CPU)")
    size, batch, warmup, steps = (32, 8, 2, 3) if dry else (a.size, a.batch_size, a.warmup, a.steps)
    name = "CPU (dry run, tiny sizes: the numbers mean nothing)" if dry else torch.cuda.get_device_name(0)
    print(f"throughput of {BACKBONE} training at {size} px, batch {batch}, bf16, on {name}", flush=True)
    bare = bare_timm_loop(device, size, batch, warmup, steps)
    print(f"  bare timm loop (timm benchmark.py's train loop), synthetic batches on the device: {bare:.0f} img/s",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = image_folder(Path(tmp) / "data", batch * (warmup + steps), batch, size + size // 7)
        print(f"  ({batch * (warmup + steps) + batch} JPEGs written in {time.perf_counter() - t0:.0f} s)", flush=True)
        ft = finetune_fit(data, Path(tmp) / "runs", "cpu" if dry else "gpu", size, batch, warmup)
    print(f"  finetune.fit from JPEG files: {ft['wall']:.0f} img/s wall, {ft['compute']:.0f} img/s compute "
          f"({ft['images']} images timed)")
    print(f"  ratio to the bare loop: wall {ft['wall'] / bare:.2f}, compute {ft['compute'] / bare:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "size": size, "batch": batch, "bare": bare, **ft}))


def ddp(a: argparse.Namespace) -> None:
    dry = a.cpu_dry_run
    if not dry and torch.cuda.device_count() < 2:
        sys.exit("ddp: fewer than 2 CUDA devices")
    # every rank runs this; the data folder and run folder must be the same for all: rank 0's arguments
    root = Path(a.work)
    data = root / "data"
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not (data / "val").is_dir():
        image_folder(data, 64, 32, 48)
    run = fit(data, "natural", out=root / "runs", name="ddp", progress=False,
              overrides=[f"train.accelerator={'cpu' if dry else 'gpu'}", "train.devices=2", "train.strategy=ddp",
                         "train.epochs=2", "image.size=32", "train.batch_size=16", "train.num_workers=0",
                         *([] if dry else ["train.precision=bf16-mixed"])])
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        summary = run.read_json("summary.json")
        m = summary["final_metrics"]
        print(f"ddp: 2 {'CPU processes (gloo)' if dry else 'GPUs (nccl)'}: {summary['epochs']} epochs, val_acc "
              f"{m['val_acc']:.3f}, run {run.path}")
        if summary["epochs"] != 2:
            sys.exit(f"ddp: the run stopped after {summary['epochs']} epochs, not 2")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("throughput", help="bf16 training throughput against a bare timm loop")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256, help="timm benchmark.py's default")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (cuDNN autotuning, allocator)")
    p.add_argument("--steps", type=int, default=25, help="timed steps")
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--cpu-dry-run", action="store_true")
    p = sub.add_parser("ddp", help="fit on 2 devices with DDP")
    p.add_argument("work", help="a folder for the data and the run (the same for both ranks)")
    p.add_argument("--cpu-dry-run", action="store_true")
    a = ap.parse_args(argv)
    {"throughput": throughput, "ddp": ddp}[a.what](a)


if __name__ == "__main__":
    main()
