"""Data at scale: the scan cache, header-only scans with files skipped and recorded during training, the start-up
timer, packed (litdata) datasets from `finetune pack` to training, one process and two (DDP, gloo)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
from PIL import Image

from finetune import data as data_mod
from finetune import fit
from finetune.data import scan

TINY = ["train.epochs=1", "image.size=16", "train.batch_size=4", "train.num_workers=0"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path, seed: int, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def folder(root: Path, n: int = 6, classes=("cat", "dog")) -> Path:
    for c, name in enumerate(classes):
        for i in range(n):
            _png(root / name / f"{i}.png", seed=100 * c + i)
    return root


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh FINETUNE_HOME: an empty scan cache."""
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def opened(monkeypatch):
    """The files the scan opens (images.examine calls), in order."""
    calls = []
    real = data_mod.examine

    def counting(path, *a, **k):
        calls.append(os.path.basename(path))
        return real(path, *a, **k)

    monkeypatch.setattr(data_mod, "examine", counting)
    return calls


def test_second_scan_of_unchanged_files_opens_none_and_reports_the_same(tmp_path, home, opened):
    data = folder(tmp_path / "data")
    (data / "cat" / "bad.png").write_bytes(b"")
    first = scan(data, max_bad_fraction=1)
    assert len(opened) == 13 and (home / "scan.sqlite").is_file()
    opened.clear()
    second = scan(data, max_bad_fraction=1)
    assert opened == []
    assert second.report() == first.report()
    pd.testing.assert_frame_equal(second.image_info, first.image_info)


def test_a_changed_file_is_checked_again(tmp_path, home, opened):
    data = folder(tmp_path / "data")
    scan(data)
    opened.clear()
    _png(data / "cat" / "0.png", seed=7, size=24)  # new content, new size
    os.utime(data / "dog" / "1.png", ns=(0, os.stat(data / "dog" / "1.png").st_mtime_ns + 10**9))  # touched only
    (data / "dog" / "2.png").write_bytes((data / "dog" / "2.png").read_bytes()[:60])  # broken, smaller
    s = scan(data)
    assert sorted(opened) == ["0.png", "1.png", "2.png"]
    assert s.bad["path"].map(os.path.basename).tolist() == ["2.png"] and s.bad["reason"][0].startswith("truncated")
    assert s.image_info.set_index(s.image_info["path"].map(lambda p: os.path.relpath(p, data))).loc["cat/0.png", "width"] == 24


def test_header_only_results_do_not_answer_a_full_scan(tmp_path, home, opened):
    data = folder(tmp_path / "data", n=2)
    scan(data, decode=False)
    opened.clear()
    scan(data, decode=True)
    assert len(opened) == 4
    opened.clear()
    scan(data, decode=False)  # a full result answers a header-only scan
    assert opened == []


def test_channels_are_checked_after_the_cache(tmp_path, home):
    data = folder(tmp_path / "data", n=2)
    assert len(scan(data, channels=3).bad) == 0
    assert scan(data, channels=1).bad.empty  # RGB reads as gray: fine
    with pytest.raises(data_mod.DataError, match="4 of 4 files .* are bad .*: wrong channels 4"):
        scan(data, channels=2)


def test_strict_scan_stops_at_the_first_bad_file_and_caches_nothing_unchecked(tmp_path, home):
    data = folder(tmp_path / "data", n=2)
    (data / "cat" / "0.png").write_bytes(b"")
    with pytest.raises(data_mod.DataError, match="0.png: empty file"):
        scan(data, strict=True)
    (data / "cat" / "0.png").unlink()
    assert scan(data).bad.empty  # files the strict scan never reached were not cached as bad


class CountImages(pl.Callback):
    """The number of images in each training batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(len(batch[1]))


class BreakAFile(CountImages):
    """Truncates one training image after the header-only scan passed it."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def on_train_start(self, trainer, pl_module):
        self.path.write_bytes(self.path.read_bytes()[:60])


def test_file_broken_after_a_header_scan_is_skipped_recorded_and_nothing_else_is_lost(tmp_path, home):
    data = folder(tmp_path / "data", n=6)
    victim = data / "cat" / "3.png"
    spy = BreakAFile(victim)
    run = fit(data, "natural", out=tmp_path / "runs", progress=False, callbacks=[spy],
              overrides=[*TINY, "train.epochs=2", "train.val_fraction=0", "train.scan=header"])
    skipped = pd.read_csv(run.path / "skipped_during_training.csv")
    assert set(skipped["path"]) == {str(victim)} and skipped["reason"].str.startswith("truncated").all()
    assert run.summary["skipped_during_training"] == 1 and run.summary["epochs"] == 2
    assert sum(spy.seen) == 2 * 11  # both epochs trained on every other image
    assert pd.read_csv(run.path / "bad_files.csv").empty  # the scan had found nothing
    startup = json.loads((run.path / "startup.json").read_text())
    assert list(startup["phases_s"]) == ["scan", "split", "model", "plan", "first_batch"]
    assert startup["to_first_step_s"] == pytest.approx(sum(startup["phases_s"].values()), abs=0.01)


def test_a_batch_of_failures_only_stops_training_naming_a_file(tmp_path):
    data = folder(tmp_path / "data", n=2)
    s = scan(data, cache=False)
    ds = data_mod.ImageDataset(s.items, s.class_to_idx, skipped=tmp_path / "skipped.csv")
    for p in s.items["path"]:
        os.remove(p)
    assert isinstance(ds[0], data_mod.ImageError)
    with pytest.raises(data_mod.DataError, match=r"every image of a batch failed.*0\.png: missing file"):
        data_mod.drop_failed([ds[0], ds[1]])


# -- packed data --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The textures folder (3 classes, val/ given) with two bad files, and its packed copy."""
    from finetune.pack import pack
    from finetune.recipe import load_recipe
    from finetune.examples import texture_folder
    root = tmp_path_factory.mktemp("pack")
    data = texture_folder(root / "textures", patch=64, val_every=4)
    (data / "train" / "brick" / "empty.png").write_bytes(b"")
    dest = pack(data, load_recipe("natural"), str(root / "packed")).url
    return data, Path(dest)


def test_pack_keeps_classes_splits_and_report_and_never_overwrites(packed, tmp_path):
    from finetune.pack import pack
    from finetune.packed import PackedData
    from finetune.recipe import load_recipe
    from finetune.train import prepare
    data, dest = packed
    items, classes, sc = prepare(data, load_recipe("natural"))
    p = PackedData(str(dest))
    assert p.classes == classes
    pd.testing.assert_frame_equal(p.items, items[["path", "label", "split"]].reset_index(drop=True))
    assert p.bad["path"].map(os.path.basename).tolist() == ["empty.png"]
    assert sorted(os.listdir(dest)) == ["finetune_pack.json", "train", "val"]
    with pytest.raises(FileExistsError, match="never overwrites"):
        pack(data, load_recipe("natural"), str(dest))


def test_packed_chunks_mix_the_classes(packed):
    """Samples are written in a seeded random order, not class by class: litdata's shuffle permutes chunks, so
    chunks that each held one class would give single-class stretches of an epoch."""
    from litdata import StreamingDataset
    _, dest = packed
    stream = StreamingDataset(str(dest / "train"))
    labels = [int(stream[i]["label"]) for i in range(20)]
    assert len(set(labels)) == 3 and labels != sorted(labels)


def test_train_from_packed_data_writes_the_same_run_folder(packed, tmp_path):
    data, dest = packed
    runs = tmp_path / "runs"
    folder_run = fit(data, "natural", out=runs, name="folder", progress=False, overrides=TINY)
    packed_run = fit(dest, "natural", out=runs, name="packed", progress=False, overrides=TINY)
    assert packed_run.classes == folder_run.classes
    pd.testing.assert_frame_equal(packed_run.items, folder_run.items)
    assert pd.read_csv(packed_run.path / "bad_files.csv").equals(pd.read_csv(folder_run.path / "bad_files.csv"))
    assert packed_run.read_json("data.json")["packed"] == str(dest)
    logged = pd.read_csv(packed_run.path / "metrics.csv")
    assert logged["val_acc"].notna().any() and packed_run.summary["epochs"] == 1
    assert list(json.loads((packed_run.path / "startup.json").read_text())["phases_s"]) == [
        "index", "model", "plan", "first_batch"]


def test_packed_run_resumes_at_an_epoch_boundary(packed, tmp_path):
    data, dest = packed

    class StopAfterFirstEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("stopped")  # after the first epoch's checkpoint

    with pytest.raises(RuntimeError, match="stopped"):
        fit(dest, "natural", out=tmp_path, name="r", progress=False, callbacks=[StopAfterFirstEpoch()],
            overrides=[*TINY, "train.epochs=2"])
    assert (tmp_path / "r" / "checkpoints" / "last.ckpt").is_file()
    spy = CountImages()
    run = fit(resume=tmp_path / "r", progress=False, callbacks=[spy])
    epochs = pd.read_csv(run.path / "metrics.csv").dropna(subset=["val_acc"])["epoch"].tolist()
    assert run.summary["epochs"] == 2 and epochs == [0, 1]
    assert sum(spy.seen) == 144  # the second epoch streams the whole training split again


def test_packed_refuses_what_needs_the_files(packed, tmp_path):
    _, dest = packed
    with pytest.raises(data_mod.DataError, match="image.intensity: dataset reads the image files"):
        fit(dest, "natural", out=tmp_path, progress=False, overrides=[*TINY, "image.intensity=dataset"])
    with pytest.raises(data_mod.DataError, match="loss.balance: sampler needs random access"):
        fit(dest, "natural", out=tmp_path, progress=False, overrides=[*TINY, "loss.balance=sampler"])


DDP_SCRIPT = textwrap.dedent('''
    import json, sys
    import pytorch_lightning as pl
    from finetune import fit

    class Record(pl.Callback):
        def __init__(self):
            self.paths = []
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.paths.append(len(batch[1]))
        def on_train_epoch_end(self, trainer, pl_module):
            with open(f"{sys.argv[2]}/rank{trainer.global_rank}.json", "w") as f:
                json.dump({"world": trainer.world_size, "images": sum(self.paths)}, f)

    if __name__ == "__main__":
        fit(sys.argv[1], "natural", out=sys.argv[2], name="ddp", progress=False, callbacks=[Record()],
            overrides=["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp", "train.epochs=1",
                       "image.size=32", "train.batch_size=16", "train.num_workers=0"])
''')


def test_two_process_ddp_streams_a_share_of_packed_data_to_each_rank(packed, tmp_path):
    _, dest = packed
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(dest), str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # each rank reads its share of the 144 training images, not all of them; litdata drops what would leave the
    # ranks with unequal batch counts (a DDP step waits for every rank)
    assert ranks[0]["images"] == ranks[1]["images"] and 144 - 2 * 16 < 2 * ranks[0]["images"] <= 144
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ddp"]
    assert pd.read_csv(tmp_path / "ddp" / "metrics.csv")["val_acc"].notna().any()


def test_packed_data_without_a_validation_split_trains(tmp_path):
    from finetune.pack import pack
    from finetune.recipe import load_recipe
    data = folder(tmp_path / "data", n=4)
    dest = pack(data, load_recipe("natural").override(["train.val_fraction=0"]), str(tmp_path / "packed")).url
    assert sorted(os.listdir(dest)) == ["finetune_pack.json", "train"]
    run = fit(dest, "natural", out=tmp_path / "runs", progress=False, overrides=[*TINY, "train.val_fraction=0"])
    assert run.summary["epochs"] == 1 and set(run.items["split"]) == {"train"}


def test_process_pool_scan_gives_what_the_thread_pool_gives(tmp_path, home, monkeypatch):
    data = folder(tmp_path / "data", n=3)
    (data / "dog" / "bad.png").write_bytes(b"not a png")
    threads = scan(data, max_bad_fraction=1, cache=False)
    monkeypatch.setattr(data_mod, "_PROCESSES_FROM", 1)  # processes (fork) and the progress bar from one file on
    processes = scan(data, max_bad_fraction=1, cache=False, progress=True)
    assert processes.report() == threads.report() and len(processes.bad) == 1
