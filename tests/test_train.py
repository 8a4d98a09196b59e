"""End to end: a folder of real images (scikit-image textures) to a trained run, reloaded and predicted; the
command line's train: a clean log, Ctrl-C and SIGTERM that say how to continue, a finished run extended."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import pytorch_lightning as pl
import torch

from finetune import fit
from finetune.examples import texture_folder
from finetune.predict import Predictor
from finetune.recipe import list_recipes
from finetune.run import RunError

FAST = ["train.epochs=2", "image.size=48", "train.batch_size=16", "train.num_workers=0"]


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return texture_folder(tmp_path_factory.mktemp("data") / "textures", patch=64, val_every=4)


class Capture(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.start = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.held = not pl_module.model.conv_stem.training and pl_module.model.classifier.training

    def on_fit_end(self, trainer, pl_module):
        self.module = pl_module


def _train_loss(model, predictor, paths, labels):
    x = torch.stack([predictor.preprocess.load(p) for p in paths])
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model.eval()(x), torch.tensor(labels)).item()


def test_fit_lowers_loss_writes_run_and_reloads_identically(textures, tmp_path):
    cap = Capture()
    run = fit(textures, "natural", out=tmp_path, name="r1", overrides=FAST, progress=False, callbacks=[cap])
    for f in ["recipe.yaml", "classes.json", "items.csv", "plan.json", "plan.txt", "data.json", "summary.json",
              "metrics.csv", "checkpoints/last.ckpt"]:
        assert (run.path / f).exists(), f
    assert run.classes == ["brick", "grass", "gravel"]
    summary = run.summary
    assert summary["final_metrics"]["val_acc"] > 0.5
    # the plan held fixed groups through training without leaving anything on the model
    model = cap.module.model
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert not torch.nn.modules.module._global_forward_pre_hooks and not torch.nn.modules.module._global_forward_hooks
    assert cap.held and all(m.training for m in model.train().modules())
    # the checkpoint reloads to identical predictions
    pred = Predictor.load(run.path, checkpoint="last")
    items = run.items[run.items["split"] == "train"].head(24)
    x = torch.stack([pred.preprocess.load(p) for p in items["path"]])
    model = cap.module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pred.predict(x), model(x).softmax(-1), rtol=0, atol=0)
    # and training lowered the loss on the training images
    fresh = Predictor.load(run.path, checkpoint="last").model
    fresh.load_state_dict(cap.start)
    labels = [run.classes.index(c) for c in items["label"]]
    assert _train_loss(model, pred, items["path"], labels) < _train_loss(fresh, pred, items["path"], labels)
    # predictions as a table
    table = pred.predict_paths([textures / "val"], top_k=2)
    assert list(table.columns) == ["path", "label_1", "prob_1", "label_2", "prob_2"]
    assert (table["prob_1"] >= table["prob_2"]).all()
    truth = table["path"].map(lambda p: p.split("/")[-2])
    assert (truth == table["label_1"]).mean() > 0.5


def test_existing_run_is_never_overwritten(textures, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="never overwritten"):
        fit(textures, "natural", out=tmp_path, name="taken", overrides=FAST, progress=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("recipe", sorted(list_recipes()))
def test_every_shipped_recipe_trains_a_few_steps(recipe, textures, tmp_path):
    overrides = ["train.epochs=1", "image.size=32", "train.batch_size=32", "train.num_workers=0"]
    run = fit(textures, recipe, out=tmp_path, name=recipe, overrides=overrides, progress=False)
    assert run.summary["epochs"] == 1
    assert (run.path / "checkpoints" / "last.ckpt").exists()
    assert json.loads((run.path / "data.json").read_text())["preprocess"]["channels"] in (1, 3)


def _tiff_folder(root, channels, n=12, size=40):
    """Two classes of 16-bit TIFFs whose difference lies above 8 bits: stripes against blobs."""
    import numpy as np
    import tifffile
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for label in ("stripes", "blobs"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            base = np.sin(xx / 2.0 + i) if label == "stripes" else np.sin(xx / 6.0) * np.sin(yy / 6.0 + i)
            img = 30_000 + 20_000 * base[..., None] + rng.normal(0, 500, (size, size, channels))
            img = img.astype(np.uint16)
            tifffile.imwrite(root / label / f"{i}.tif", img if channels > 1 else img[..., 0],
                             photometric="minisblack", planarconfig="contig" if channels > 1 else None)
    return root


@pytest.mark.parametrize("channels,overrides", [
    (1, []),
    (4, ["image.channels=4", "image.stem=adapt"]),
])
def test_16bit_and_multichannel_tiffs_train_and_predict(tmp_path, channels, overrides):
    data = _tiff_folder(tmp_path / "tiffs", channels)
    run = fit(data, "microscopy", out=tmp_path / "runs", name="t", progress=False,
              overrides=["train.epochs=1", "image.size=32", "train.batch_size=8", "train.num_workers=0", *overrides])
    pre = json.loads((run.path / "data.json").read_text())["preprocess"]
    assert pre["channels"] == (4 if channels == 4 else 3) and pre["intensity"] == "percentile"
    pred = Predictor.load(run.path)
    first = next(pred.model.parameters())
    assert first.shape[1] == (4 if channels == 4 else 3)  # the stem takes what the files hold
    table = pred.predict_paths([data], top_k=2)
    assert len(table) == 24 and set(table["label_1"]) <= {"stripes", "blobs"}
    assert table[["prob_1", "prob_2"]].sum(axis=1).round(4).eq(1).all()


class TiedScores(pl.Callback):
    """Every epoch validates to the same accuracy; only the loss differs."""
    losses = [0.9, 0.3, 0.3, 0.6]

    def on_validation_end(self, trainer, pl_module):  # before ModelCheckpoint, which Lightning runs last
        trainer.callback_metrics.update(val_acc=torch.tensor(0.5),
                                        val_loss=torch.tensor(self.losses[trainer.current_epoch]))


def test_tied_scores_keep_the_lowest_loss_then_the_later_epoch(textures, tmp_path):
    run = fit(textures, "natural", out=tmp_path, name="ties", progress=False, callbacks=[TiedScores()],
              overrides=["train.epochs=4", "image.size=16", "train.batch_size=64", "train.num_workers=0"])
    assert sorted(p.name for p in (run.path / "checkpoints").glob("best-*")) == ["best-epoch=02.ckpt"]
    assert run.summary["best_checkpoint"].endswith("best-epoch=02.ckpt") and run.summary["best_score"] == 0.5


NOISE = ["litlogger", "LeafSpec", "log_every_n_steps", "exists and is not empty", "Traceback"]


def _cli(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "finetune.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_cli_train_log_is_clean_and_resume_extends_a_finished_run(textures, tmp_path):
    opts = ["--image-size", "16", "--batch-size", "64", "--no-progress", "--set", "train.num_workers=0"]
    first = _cli("train", textures, "--out", tmp_path, "--name", "r", "--epochs", "1", *opts)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    more = _cli("train", "--resume", tmp_path / "r", "--epochs", "2", "--no-progress")
    out2, err2 = more.communicate(timeout=600)
    assert more.returncode == 0, err2[-3000:]
    for text in (out + err, out2 + err2):
        assert not [n for n in NOISE if n in text], text[-3000:]
        assert re.search(r"val_acc = \d\.\d{4}\)", text) and not re.search(r"\d\.\d{6}", text), text
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["attempts"] == 2
    assert "epochs: 2" in (tmp_path / "r" / "recipe.yaml").read_text()
    refused = _cli("train", "--resume", tmp_path / "r", "--epochs", "3", "--lr", "0.5", "--no-progress")
    assert refused.wait(timeout=300) == 2 and "only --epochs" in refused.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopped_training_says_how_to_continue(textures, tmp_path, sig):
    proc = _cli("train", textures, "--out", tmp_path, "--name", "s", "--epochs", "50", "--image-size", "16",
                "--batch-size", "64", "--no-progress", "--set", "train.num_workers=0")
    deadline = time.monotonic() + 300
    while not (tmp_path / "s" / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == f"stopped; continue with: finetune train --resume {tmp_path / 's'}"
    assert "Traceback" not in err
