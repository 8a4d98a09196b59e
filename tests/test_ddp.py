"""Two-process DDP on the CPU (gloo), launched by Lightning itself as a user would (``train.devices=2``), for every
kind of plan: the default recipe's automatic LP-FT plan, ``bn: affine`` without a schedule, ``gradual`` and
``bn: adapt``. Each runs 3 or more epochs and must finish with one run folder, the same weights on both ranks, a new
sample order on each rank every epoch, the strategy built from the plan, and metrics reduced over both ranks."""
import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from finetune.predict import Predictor
from finetune.run import Run

# Lightning's DDP launcher starts the other rank by running this script again with the same arguments.
SCRIPT = textwrap.dedent('''
    import json, sys
    import pytorch_lightning as pl
    import torch
    from finetune import fit

    class Record(pl.Callback):
        """What each rank drew every epoch, what it validated, its strategy and its final weights."""
        orders, requires_grad = {}, {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.orders[trainer.current_epoch] = [i for i, _ in trainer.train_dataloader.sampler]
                self.requires_grad[trainer.current_epoch] = sum(p.requires_grad for p in pl_module.parameters())

        def on_fit_end(self, trainer, pl_module):
            out, rank = sys.argv[2], trainer.global_rank
            torch.save(pl_module.model.state_dict(), f"{out}/weights{rank}.pt")
            record = {"world": trainer.world_size, "orders": self.orders, "requires_grad": self.requires_grad,
                      "val": list(iter(trainer.val_dataloaders.sampler)),
                      "find_unused": trainer.strategy._ddp_kwargs.get("find_unused_parameters", False)}
            with open(f"{out}/rank{rank}.json", "w") as f:
                json.dump(record, f)

    if __name__ == "__main__":
        fit(sys.argv[1], "natural", out=sys.argv[2], name="ddp", progress=False, callbacks=[Record()],
            overrides=["train.accelerator=cpu", "train.devices=2", "image.size=32", "train.batch_size=16",
                       "train.num_workers=0", *json.loads(sys.argv[3])])
''')


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    from finetune.examples import texture_folder
    return texture_folder(tmp_path_factory.mktemp("data") / "textures", patch=64, val_every=4)


@pytest.mark.parametrize("overrides,schedule,unused", [
    ([], "lp-ft", True),  # the default recipe: automatic plan, strategy auto
    (["freeze.bn=affine", "freeze.schedule=none", "train.strategy=ddp"], "none", False),
    (["freeze.schedule=gradual", "train.epochs=4"], "gradual", True),
    (["freeze.bn=adapt"], "lp-ft", True),
], ids=["auto-lpft", "affine-none", "gradual", "adapt"])
def test_two_process_ddp_trains_every_plan(textures, tmp_path, overrides, schedule, unused):
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = ["train.epochs=3", *overrides]
    done = subprocess.run([sys.executable, str(script), str(textures), str(tmp_path), json.dumps(overrides)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ddp"]  # one run folder, not one per rank
    run = Run.open(tmp_path / "ddp")
    epochs = int(overrides[-1].split("=")[1]) if "train.epochs=4" in overrides else 3
    assert run.summary["epochs"] == epochs and run.plan.schedule == schedule

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["find_unused"] for r in ranks] == [unused, unused]
    for e in range(epochs):  # each rank draws half of one shared order, a new order every epoch
        a, b = ranks[0]["orders"][str(e)], ranks[1]["orders"][str(e)]
        assert len(a) == len(b) == 72 and set(a) | set(b) == set(range(144))
        if e:
            assert a != ranks[0]["orders"][str(e - 1)] and b != ranks[1]["orders"][str(e - 1)]
    if schedule != "none":  # the schedule released groups under DDP
        assert ranks[0]["requires_grad"]["0"] < ranks[0]["requires_grad"][str(epochs - 1)]
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in (0, 1))
    assert [k for k in w0 if not torch.equal(w0[k], w1[k])] == []

    halves = [set(r["val"]) for r in ranks]
    assert len(halves[0]) == len(halves[1]) == 24 and halves[0] | halves[1] == set(range(48))
    if not overrides[1:]:  # the logged metric is reduced over both ranks: it is the accuracy on all 48 images
        logged = pd.read_csv(run.path / "metrics.csv").dropna(subset=["val_acc"]).iloc[-1]
        pred = Predictor.load(run.path, checkpoint="last")
        val = run.items[run.items["split"] == "val"]
        x = torch.stack([pred.preprocess.load(p) for p in val["path"]])
        y = torch.tensor([run.classes.index(c) for c in val["label"]])
        acc = (pred.predict(x).argmax(1) == y).float().mean().item()
        assert logged["val_acc"] == pytest.approx(acc, abs=1e-6)
