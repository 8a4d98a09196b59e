"""Two-process DDP on the CPU (gloo), launched by Lightning itself as a user would (``strategy=ddp``, ``devices=2``):
one run folder, each rank sees its half of the validation set, and the logged metrics are reduced over both."""
import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from finetune.examples import texture_folder
from finetune.predict import Predictor
from finetune.run import Run

# Lightning's DDP launcher starts the other rank by running this script again with the same arguments.
SCRIPT = textwrap.dedent('''
    import json, sys
    import pytorch_lightning as pl
    from finetune import fit

    class Record(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            record = {"world": trainer.world_size, "val": list(iter(trainer.val_dataloaders.sampler))}
            with open(f"{sys.argv[2]}/rank{trainer.global_rank}.json", "w") as f:
                json.dump(record, f)

    if __name__ == "__main__":
        fit(sys.argv[1], "natural", out=sys.argv[2], name="ddp", progress=False, callbacks=[Record()],
            overrides=["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp", "train.epochs=1",
                       "image.size=32", "train.batch_size=16", "train.num_workers=0"])
''')


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return texture_folder(tmp_path_factory.mktemp("data") / "textures", patch=64, val_every=4)


@pytest.mark.slow
def test_two_process_ddp_trains_one_run_with_metrics_reduced_over_ranks(textures, tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(textures), str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ddp"]  # one run folder, not one per rank
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    halves = [set(r["val"]) for r in ranks]
    assert len(halves[0]) == len(halves[1]) == 24 and halves[0] | halves[1] == set(range(48))

    run = Run.open(tmp_path / "ddp")
    logged = pd.read_csv(run.path / "metrics.csv").dropna(subset=["val_acc"]).iloc[-1]
    pred = Predictor.load(run.path, checkpoint="last")
    val = run.items[run.items["split"] == "val"]
    x = torch.stack([pred.preprocess.load(p) for p in val["path"]])
    y = torch.tensor([run.classes.index(c) for c in val["label"]])
    acc = (pred.predict(x).argmax(1) == y).float().mean().item()
    assert logged["val_acc"] == pytest.approx(acc, abs=1e-6)
    assert run.summary["epochs"] == 1
