"""``train.refit``: after the fit that chose on the validation split, a second fit on train + val gives the final
model; the run keeps the first fit's validation scores, evaluation knows which images the final model saw."""
import json

import pandas as pd
import pytest
import pytorch_lightning as pl

from finetune import fit
from finetune.evaluate import evaluate
from finetune.recipe import RecipeError, load_recipe
from finetune.report import render
from finetune.run import Run
from finetune.train import refit_wanted

pytestmark = pytest.mark.refit  # train.refit: auto as shipped
SMALL = ["train.epochs=1", "image.size=32", "train.num_workers=0"]


class ImagesSeen(pl.Callback):
    """Training images per fit (each fit's first epoch)."""

    def __init__(self):
        self.fits = []

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.fits.append(0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.fits[-1] += len(batch[1])


def test_refit_trains_the_final_model_on_train_and_val_and_resumes(textures, tmp_path):
    seen = ImagesSeen()
    run = fit(textures, "natural", out=tmp_path, name="r", overrides=SMALL, progress=False, callbacks=[seen])
    n_train, n_val = (int((run.items["split"] == s).sum()) for s in ("train", "val"))
    assert seen.fits == [n_train, n_train + n_val]
    s = run.summary
    assert s["final_model"] == "refit" and s["refit"]["images"] == n_train + n_val and s["refit"]["epochs"] == 1
    assert s["best_score"] is not None and "first fit" in s["validation_scores"]  # kept, and labelled
    final = run.checkpoint()
    assert final == run.path / "refit" / "checkpoints" / "last.ckpt" and final != run.checkpoint("best")
    assert "refit: after this plan's run chooses on the" in (run.path / "plan.txt").read_text()
    assert len(run.metrics()) == 1  # the first fit's epochs only; the refit logs in RUN/refit/logs
    html = render(run)  # the report's header labels both: the first fit's estimate, the refit final model
    assert "(first fit: an honest validation estimate)" in html and "final model refit on train + val" in html
    # the final model trained on the validation images: evaluating them says so; the best epoch's did not
    assert evaluate(run, split="val", workers=0, report=False).metrics["train_overlap"] == n_val
    assert evaluate(run, split="val", checkpoint="best", workers=0, report=False).metrics["train_overlap"] == 0
    # a crash during the refit: resume continues it, without fitting the first run again
    del s["refit"], s["final_model"]
    (run.path / "summary.json").write_text(json.dumps(s))
    again = ImagesSeen()
    fit(resume=run.path, progress=False, callbacks=[again])
    assert again.fits == [] and Run.open(run.path).summary["refit"]["epochs"] == 1


def test_refit_false_and_large_data_keep_the_best_epoch(textures, tmp_path):
    run = fit(textures, "natural", out=tmp_path, overrides=[*SMALL, "train.refit=false"], progress=False)
    assert "refit" not in run.summary and run.checkpoint() == run.checkpoint("best")
    items = pd.DataFrame({"path": [f"{i}" for i in range(1000)], "label": ["a", "b"] * 500,
                          "split": ["train"] * 800 + ["val"] * 200})
    want, why = refit_wanted(load_recipe("natural"), items, ["a", "b"])
    assert not want and "500 labelled images a class >= 300" in why


def test_refit_is_refused_where_it_cannot_run():
    items = pd.DataFrame({"path": list("abcd"), "label": ["x", "y", "x", "y"], "split": ["train"] * 2 + ["val"] * 2})
    r = load_recipe("natural")
    assert refit_wanted(r, items, ["x", "y"])[0]
    assert refit_wanted(r, items, ["x", "y"], processes=2) == (False, "no refit: 2 processes (refit runs in one)")
    assert not refit_wanted(r, items.assign(split="train"), ["x", "y"])[0]  # nothing to add
    with pytest.raises(RecipeError, match="multi-label"):
        refit_wanted(r.override(["train.refit=true", "train.labels=multi"]), items, ["x", "y"])
