"""Bad input, crashes and untrusted files, through the public entry points: ``fit``, a real killed process,
the checkpoint, weight and recipe loaders. Every test makes its own broken input; training uses 16-32 px images."""
import contextlib
import csv
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import tifffile
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from finetune import freeze, fit
from finetune.backbone import DEFAULT_BACKBONE, create_backbone
from finetune.data import DataError
from finetune.examples import texture_folder
from finetune.module import Classifier, TrainingError
from finetune.predict import Predictor
from finetune.recipe import Recipe, RecipeError, load_recipe
from finetune.run import AtomicCheckpointIO, Run, RunError, load_checkpoint

TINY = ["train.epochs=1", "image.size=16", "train.batch_size=8", "train.num_workers=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    """48 real images: 3 classes x 16 patches of 128 px, a quarter of them in val/."""
    return texture_folder(tmp_path_factory.mktemp("data") / "textures", patch=128)


# -- broken files ------------------------------------------------------------------------------------------------

def _png(path: Path, seed: int = 0) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)


def _truncated(path: Path) -> None:
    _png(path)
    path.write_bytes(path.read_bytes()[:60])


BROKEN = {  # how to break a file -> the kind of reason the report gives
    "zero-byte.png": (lambda p: p.write_bytes(b""), "empty file"),
    "text.jpg": (lambda p: p.write_text("not a photo"), "not an image"),
    "truncated.png": (_truncated, "truncated"),
    "garbage.png": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2), "corrupt"),
    "four-channels.tif": (lambda p: tifffile.imwrite(p, np.zeros((20, 20, 4), np.uint8), photometric="minisblack",
                                                     planarconfig="contig"), "wrong channels"),
}


def small_folder(root: Path, classes=("cat", "dog"), n: int = 4) -> Path:
    """``n`` random 20 px PNGs in each class folder."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            _png(root / name / f"{i}.png", seed=100 * c + i)
    return root


def _reported(run: Run) -> dict[str, str]:
    bad = pd.read_csv(run.path / "bad_files.csv")
    return {os.path.basename(p): r.split(":")[0] for p, r in zip(bad["path"], bad["reason"])}


@contextlib.contextmanager
def no_network():
    """Every connection and name lookup is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1] if len(args) > 1 else args)
        raise OSError("network use refused by the test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", lambda *a, **k: refuse(None, a[:2]))
        yield attempts


# -- bad data through fit ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reported(textures, tmp_path_factory):
    """A 1-epoch run of the default backbone, offline by force, on the textures plus one file of each broken kind."""
    data = Path(shutil.copytree(textures, tmp_path_factory.mktemp("bad") / "textures"))
    for i, (name, (write, _)) in enumerate(BROKEN.items()):
        write(data / "train" / ["brick", "grass", "gravel"][i % 3] / name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the per-test one_thread
    with no_network() as attempts:
        with pytest.raises(OSError):  # the guard works
            socket.create_connection(("127.0.0.1", 9))
        attempts.clear()
        run = fit(data, "natural", out=data.parent / "runs", name="r", overrides=TINY, progress=False)
    torch.set_num_threads(threads)
    return run, list(attempts)


def test_fit_skips_bad_files_and_lists_each_with_its_reason(reported):
    run, _ = reported
    assert _reported(run) == {name: kind for name, (_, kind) in BROKEN.items()}
    report = (run.path / "data_report.txt").read_text()
    assert f"{len(BROKEN)} bad files skipped" in report and all(name in report for name in BROKEN)
    assert not set(run.items["path"].map(os.path.basename)) & set(BROKEN)
    assert run.summary["epochs"] == 1  # trained on the rest


def test_fit_on_the_default_backbone_opens_no_connection(reported):
    run, attempts = reported
    assert run.recipe.backbone.name == DEFAULT_BACKBONE and run.recipe.backbone.pretrained
    assert attempts == []
    source = run.read_json("data.json")["weights_source"]
    assert source.startswith(("package:", "hub-cache:", "file:")), source  # real weights, found locally


def test_too_many_bad_files_stop_before_anything_is_written(tmp_path):
    data = small_folder(tmp_path / "data")
    for name in ("zero-byte.png", "text.jpg", "truncated.png"):  # 3 of 11 files: 27% > 20%
        BROKEN[name][0](data / "cat" / name)
    with pytest.raises(DataError, match=r"3 of 11 files .* max_bad_fraction 0\.2.*\n(.*\n)*.*raise "
                                        r"train\.max_bad_fraction") as e:
        fit(data, "natural", out=tmp_path / "runs", overrides=TINY, progress=False)
    assert "zero-byte.png: empty file" in str(e.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    run = fit(data, "natural", out=tmp_path / "runs", overrides=[*TINY, "train.max_bad_fraction=0.3"],
              progress=False)
    assert set(_reported(run)) == {"zero-byte.png", "text.jpg", "truncated.png"}


def test_fewer_than_two_usable_classes_is_a_data_error(tmp_path):
    data = small_folder(tmp_path / "data", classes=("cat",), n=8)
    (data / "dog").mkdir()
    BROKEN["garbage.png"][0](data / "dog" / "garbage.png")  # 1 of 9 bad: allowed, but dog has nothing left
    with pytest.raises(DataError, match=r"found 1 class\(es\) \(cat\).*needs at least two"):
        fit(data, "natural", out=tmp_path / "runs", overrides=TINY, progress=False)


FOLDERS = st.lists(st.tuples(st.integers(0, 4), st.lists(st.sampled_from(sorted(BROKEN)), max_size=2)),
                   min_size=1, max_size=3)  # per class: good images, broken files


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FOLDERS, st.sampled_from([0.2, 0.5]))
@example([(3, ["text.jpg"]), (4, [])], 0.2)  # trains, skipping one
@example([(2, ["zero-byte.png", "garbage.png"]), (2, [])], 0.2)  # too many bad
def test_fit_on_random_folders_trains_and_reports_exactly_or_refuses_clearly(spec, max_bad):
    with tempfile.TemporaryDirectory() as tmp:
        data, broken, classes = Path(tmp) / "data", set(), 0
        for c, (n_good, bad) in enumerate(spec):
            (data / f"c{c}").mkdir(parents=True)
            for i in range(n_good):
                _png(data / f"c{c}" / f"{i}.png", seed=10 * c + i)
            for name in bad:
                BROKEN[name][0](data / f"c{c}" / name)
                broken.add(f"c{c}/{name}")
            classes += n_good > 0
        n_good = sum(n for n, _ in spec)
        refuse = classes < 2 or len(broken) / (len(broken) + n_good) > max_bad
        try:
            run = fit(data, "natural", out=Path(tmp) / "runs", overrides=[*TINY, f"train.max_bad_fraction={max_bad}"],
                      progress=False)
        except DataError as e:
            assert refuse, e
            assert re.search("max_bad_fraction|needs at least two|no usable images", str(e)), e
            event("refused")
            return
        assert not refuse
        bad = pd.read_csv(run.path / "bad_files.csv")
        assert {os.path.relpath(p, data) for p in bad["path"]} == broken
        assert len(run.items) == n_good and run.summary["epochs"] == 1
        event("trained")


# -- faults: a killed run resumes to the same result ------------------------------------------------------------------

LP_FT = ["--epochs", "3", "--image-size", "32", "--batch-size", "4", "--deterministic", "--no-progress",
         "--set", "train.num_workers=0", "--set", "freeze.mode=fixed", "--set", "freeze.depth=6",
         "--set", "freeze.schedule=lp-ft", "--set", "freeze.probe_epochs=1"]


def _cli(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "finetune.cli", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _logged_epochs(run: Path) -> set[str]:
    """Epochs with a row in the CSV log (Lightning rewrites it at every logging step)."""
    try:
        with open(run / "logs" / "version_0" / "metrics.csv", newline="") as f:
            return {row["epoch"] for row in csv.DictReader(f)}
    except (FileNotFoundError, KeyError):
        return set()


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_same_weights_and_metrics(textures, tmp_path):
    out = tmp_path / "runs"
    full = _cli("train", str(textures), "--out", str(out), "--name", "full", *LP_FT, log=tmp_path / "full.log")
    cut = _cli("train", str(textures), "--out", str(out), "--name", "cut", *LP_FT, log=tmp_path / "cut.log")
    deadline = time.monotonic() + 300
    # epoch 1, the first fine-tuning epoch after the probe, logs a step (its 3rd of 9): kill it there
    while "1" not in _logged_epochs(out / "cut") and cut.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    cut.send_signal(signal.SIGKILL)
    assert cut.wait() == -signal.SIGKILL, (tmp_path / "cut.log").read_text()[-3000:]
    assert full.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()[-3000:]
    assert load_checkpoint(out / "cut" / "checkpoints" / "last.ckpt")["epoch"] == 0  # killed before epoch 1's
    assert not (out / "cut" / "summary.json").exists()
    recipe = (out / "cut" / "recipe.yaml").read_bytes()

    resumed = _cli("train", "--resume", str(out / "cut"), "--no-progress", log=tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]

    a, b = _weights(out / "full"), _weights(out / "cut")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    full_summary, cut_summary = Run(out / "full").summary, Run(out / "cut").summary
    assert cut_summary["final_metrics"] == full_summary["final_metrics"]
    assert cut_summary["epochs"] == full_summary["epochs"] == 3 and cut_summary["resumed"]
    # resuming appended: the first attempt's log and the run's records are still there, unchanged
    assert (out / "cut" / "logs" / "version_0" / "metrics.csv").exists()
    assert (out / "cut" / "recipe.yaml").read_bytes() == recipe


# -- faults: checkpoints are written atomically -----------------------------------------------------------------------

def _half_a_checkpoint(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a checkpoint")
    f.flush()


def test_checkpoint_save_that_fails_halfway_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0, "w": torch.ones(3)}, path)

    def die_halfway(obj, f, *args, **kwargs):
        _half_a_checkpoint(obj, f)
        raise KeyboardInterrupt  # a BaseException, as when the user presses Ctrl-C during the save

    monkeypatch.setattr(torch, "save", die_halfway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a process in the middle of a save")
def test_checkpoint_save_killed_halfway_keeps_the_old_one(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0, "w": torch.ones(3)}, path)
    pid = os.fork()
    if pid == 0:  # the child writes half a checkpoint, then hangs until killed
        try:
            torch.save = lambda obj, f, *a, **k: (_half_a_checkpoint(obj, f), time.sleep(60))
            AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, path)
        finally:
            os._exit(1)
    deadline = time.monotonic() + 30
    while not [p for p in tmp_path.iterdir() if p != path and p.stat().st_size] and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    # what the kill leaves is a hidden temporary file, which no reader of the run folder picks up
    assert [p.name.startswith(".last.ckpt.") and p.suffix == ".tmp" for p in tmp_path.iterdir() if p != path] == [True]


# -- faults: a non-finite loss stops the run, keeping the last good checkpoint -----------------------------------------

class PoisonAt(pl.Callback):
    """Fills the head with NaN when an epoch starts: the next loss is NaN."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                pl_module.model.get_classifier().weight.fill_(math.nan)


def test_nan_loss_stops_with_what_to_do_and_keeps_the_last_good_checkpoint(tmp_path):
    data = small_folder(tmp_path / "data")
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1.*last good checkpoint is kept.*"
                                            r"Lower optim\.lr"):
        fit(data, "natural", out=tmp_path / "runs", name="r", overrides=[*TINY, "train.epochs=2"], progress=False,
            callbacks=[PoisonAt(1)])
    run = Run(tmp_path / "runs" / "r")
    ckpt = load_checkpoint(run.checkpoint("last"))
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (run.path / "summary.json").exists()
    early = Path(shutil.copytree(run.path, tmp_path / "early", ignore=shutil.ignore_patterns("*.ckpt")))
    with pytest.raises(RunError, match="has no last checkpoint yet .* start it again"):  # killed in epoch 0
        fit(resume=early, progress=False)
    resumed = fit(resume=run.path, progress=False)  # the kept checkpoint carries on
    assert resumed.summary["epochs"] == 2 and math.isfinite(resumed.summary["final_metrics"]["train_loss"])


class InfiniteLoss(torch.nn.Module):
    def forward(self, logits, target):
        return logits.sum() * 0 + math.inf


def test_infinite_loss_stops_with_what_to_do():
    model = create_backbone(DEFAULT_BACKBONE, 2, pretrained=False)
    module = Classifier(model, freeze.full(model), Recipe(), ["a", "b"])
    module.loss_fn = InfiniteLoss()
    with pytest.raises(TrainingError, match=r"loss became inf.*Lower optim\.lr"):
        module.training_step((torch.ones(2, 3, 32, 32), torch.tensor([0, 1])), 0)


# -- untrusted files ---------------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_is_refused_by_every_loader_and_runs_nothing(reported, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "finetune": Payload(marker)}, evil)
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    run = Path(shutil.copytree(reported[0].path, tmp_path / "run"))
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        shutil.copy(evil, ckpt)
    (run / "summary.json").unlink()  # a stopped run, which resuming loads (a finished one has nothing to resume)

    for path in (evil, legacy):
        with pytest.raises(RunError, match="refused.*nothing in it was executed"):
            load_checkpoint(path)
    for source in (evil, run):
        with pytest.raises(RunError, match="refused"):
            Predictor.load(source)
    with pytest.raises(RunError, match="refused"):
        fit(resume=run, progress=False)
    for path in (evil, legacy):
        with pytest.raises(ValueError, match=r"refused.*weights_only=True.*nothing in it was executed"):
            create_backbone(DEFAULT_BACKBONE, 3, weights=path)
    assert not marker.exists()

    torch.load(evil, weights_only=False)  # the control: loaded as a plain pickle, the file does run its command
    assert marker.exists()


EVIL_YAML = "name: x\noptim:\n  lr: !!python/object/apply:os.system ['touch {}']\n"


def test_recipe_yaml_with_python_tags_is_refused_and_runs_nothing(reported, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(EVIL_YAML.format(marker))
    with pytest.raises(RecipeError, match="not valid YAML.*python/object/apply"):
        load_recipe(tmp_path / "evil.yaml")
    run = Path(shutil.copytree(reported[0].path, tmp_path / "run"))
    (run / "recipe.yaml").write_text(EVIL_YAML.format(marker))  # a tampered run folder
    with pytest.raises(RecipeError):
        fit(resume=run, progress=False)
    assert not marker.exists()
