"""optim.lr: find: Lightning's finder runs on the plan's groups, writes its curve and reason, and the rate it picks
is the head's rate of the optimizer, the plan's multipliers kept."""
import json

import pytest
import pytorch_lightning as pl
from PIL import Image

from finetune import fit
from finetune.cli import main

TINY = ["train.epochs=1", "image.size=32", "train.num_workers=0", "train.batch_size=8", "optim.warmup_epochs=0",
        "optim.schedule=constant", "freeze.mode=fixed", "freeze.depth=2", "freeze.lr_decay=0.5"]


class Rates(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.groups = [dict(g, params=None) for g in trainer.optimizers[0].param_groups]


def test_found_rate_is_the_heads_with_the_plans_multipliers(textures, tmp_path, one_thread):
    rates = Rates()
    run = fit(textures, "natural", out=tmp_path, name="r", progress=False, overrides=TINY + ["optim.lr=find"],
              callbacks=[rates])
    found = json.loads((run.path / "lr_find.json").read_text())
    assert 1e-6 < found["lr"] < 1 and found["steps"] > 20
    assert Image.open(run.path / "lr_find.png").size[0] > 300
    plan_txt = (run.path / "plan.txt").read_text()
    assert f"learning rate {found['lr']:.3g} for the head" in plan_txt and "lr_find.png" in plan_txt
    plan = run.plan
    mults = [g["lr_scale"] * plan.groups[g["stage"]].live_at(0) for g in rates.groups]
    assert len(set(mults)) >= 3 and 0.0 in mults  # fixed groups, decayed groups, the head
    assert [g["lr"] for g in rates.groups] == pytest.approx([found["lr"] * m for m in mults])


def test_lr_find_command_writes_the_curve_without_training(textures, tmp_path, capsys, one_thread):
    assert main(["lr-find", str(textures), "--out", str(tmp_path), *sum([["--set", o] for o in TINY], [])]) == 0
    out = capsys.readouterr().out
    (run,) = tmp_path.iterdir()
    assert "learning rate" in out and (run / "lr_find.png").is_file() and not list(run.glob("checkpoints/*.ckpt"))


def test_choice_skips_the_smoothing_start_and_takes_a_tenth_of_the_valley():
    import numpy as np
    from finetune.lr_find import choose
    lrs = np.logspace(-6, 0, 90)
    loss = 0.65 - 0.15 * np.exp(-((np.log10(lrs) + 2) ** 2) / 0.5) + 5 * (lrs > 0.2)  # valley at 1e-2, then diverges
    loss[0], loss[3] = 0.30, np.nan  # one lucky first batch, one non-finite step
    lr, why = choose(lrs, loss, steepest=2e-5)
    assert lr == pytest.approx(1e-3, rel=0.2) and "a tenth of 0.0095" in why and "2e-05" in why
    assert choose(lrs[:12], loss[:12])[0] == 1e-3  # too short a curve: the default, said so
