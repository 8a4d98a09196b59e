"""export: ONNX and TorchScript give PyTorch's output on real images, carry labels and preprocessing, predict
without the training code, never overwrite; predict from the command line."""
import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import numpy as np

from finetune.cli import main
from finetune.export import export
from finetune.predict import OnnxBackend, Predictor, TorchBackend, expand_paths
from finetune.run import load_checkpoint



@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def exports(run):
    return {fmt: export(run, fmt) for fmt in ("onnx", "torchscript")}


@pytest.fixture(scope="module")
def reference(run):
    return Predictor.load(run.path, device="cpu")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_on_real_images(fmt, exports, reference, textures, run):
    folder = exports[fmt]
    meta = json.loads((folder / "export.json").read_text())
    assert folder.name == f"export-{fmt}" and (folder / meta["file"]).is_file()
    assert meta["format"] == fmt and meta["classes"] == reference.classes
    assert meta["preprocess"] == reference.preprocess.to_dict() and meta["input_size"] == [3, 32, 32]
    files = expand_paths([textures / "val"])
    x = torch.stack([reference.preprocess.load(f) for f in files])
    with torch.no_grad():
        expected = reference.model.eval()(x)
    exported = Predictor.load(folder, device="cpu")
    for batch in (x[:1], x[:5], x):  # the batch axis is dynamic
        assert (exported.logits(batch) - expected[:len(batch)]).abs().max() < 1e-4
    assert (exported.predict(x, tta=True) - reference.predict(x, tta=True)).abs().max() < 1e-4
    in_memory = Predictor.from_checkpoint(load_checkpoint(run.checkpoint()), device="cpu")
    torch.testing.assert_close(in_memory.predict(x), reference.predict(x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_predictor_gives_the_same_table(fmt, exports, reference, textures):
    loaded = Predictor.load(exports[fmt])
    assert isinstance(loaded.backend, {"onnx": OnnxBackend, "torchscript": TorchBackend}[fmt])
    got = loaded.predict_paths([textures / "val"], top_k=2, tta=True)
    want = reference.predict_paths([textures / "val"], top_k=2, tta=True)
    assert got[["path", "label_1", "label_2"]].equals(want[["path", "label_1", "label_2"]])
    assert (got[["prob_1", "prob_2"]] - want[["prob_1", "prob_2"]]).abs().max().max() < 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_predicts_without_training_code(fmt, exports, textures):
    code = (
        "import sys\n"
        "from finetune.predict import Predictor\n"
        f"p = Predictor.load({str(exports[fmt])!r})\n"
        f"t = p.predict_paths([{str(textures / 'val' / 'grass')!r}], top_k=1)\n"
        "assert len(t) == 16, t\n"
        "heavy = {'timm', 'pytorch_lightning', 'lightning_fabric', 'torchmetrics', 'matplotlib'}\n"
        "ours = {'finetune.train', 'finetune.run', 'finetune.backbone', 'finetune.module', 'finetune.freeze',\n"
        "        'finetune.datamodule', 'finetune.stages', 'finetune.export', 'finetune.evaluate'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in ours))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_exports_never_overwrite(run, exports, tmp_path):
    second = export(run, "onnx")
    assert second.name == "export-onnx-2" and (exports["onnx"] / "model.onnx").is_file()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export(run, "torchscript", out=taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert main(["export", str(run.path), "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 0
    assert json.loads((tmp_path / "ts" / "export.json").read_text())["format"] == "torchscript"
    assert main(["export", str(run.path), "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 2


def test_cli_predict_writes_top_k_csv_with_flip_tta(run, reference, textures, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run.path), str(textures / "val"), "--top-k", "2", "--out", str(out), "--tta",
                 "--batch-size", "7"]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["path", "label_1", "prob_1", "label_2", "prob_2"] and len(table) == 48  # no error
    assert (table["prob_1"] >= table["prob_2"]).all() and set(table["label_1"]) <= set(reference.classes)
    x = torch.stack([reference.preprocess.load(p) for p in table["path"]])
    plain, flipped = reference.predict(x), reference.model(x.flip(-1)).softmax(-1).detach()
    tta = (plain + flipped) / 2
    assert torch.allclose(torch.tensor(table["prob_1"].to_numpy(), dtype=torch.float32), tta.max(-1).values, atol=1e-5)
    assert not torch.allclose(plain, tta, atol=1e-5)  # the flip changed something, so the test can tell
    assert main(["predict", str(run.path), str(textures / "val"), "--out", str(out)]) == 2  # never overwritten
    capsys.readouterr()
    assert main(["predict", str(run.path), str(textures / "val" / "brick" / "brick_000.png"), "-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "brick_000.png" in printed and "label_3" in printed


def test_onnx_runs_without_torch_from_export_json(exports, reference, textures):
    """The numpy + onnxruntime snippet of docs/results.md, run as written on real images, gives the Predictor's
    probabilities without importing torch, albumentations or finetune."""
    folder = exports["onnx"]
    spec = json.loads((folder / "export.json").read_text())["input"]
    assert spec["resize_shorter_side"] == 36 and spec["center_crop"] == [32, 32] and spec["resize"] is None
    assert spec["mean"] == list(reference.preprocess.config["mean"]) and spec["intensity"] == "range"
    docs = (Path(__file__).parents[1] / "docs" / "results.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", docs, re.S) if "onnxruntime" in b)
    paths = [str(p) for p in expand_paths([textures / "val"])[::4]]
    code = re.sub(r"^folder = .*$", f"folder = {str(folder)!r}", snippet, count=1, flags=re.M)
    code = re.sub(r"^paths = .*$", f"paths = {paths!r}", code, count=1, flags=re.M)
    code += ("import sys\nprint(json.dumps({'probs': probs.tolist(), 'heavy': sorted(m for m in sys.modules\n"
             "      if m.split('.')[0] in ('torch', 'albumentations', 'finetune'))}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    want, errors = reference.probabilities(paths)
    assert not errors and np.abs(np.array(got["probs"]) - want.numpy()).max() < 1e-4


def test_predict_skips_unreadable_files_and_lists_them(run, reference, textures, tmp_path, capsys):
    folder = tmp_path / "new"
    folder.mkdir()
    good = sorted((textures / "val" / "grass").iterdir())[:3]
    for f in good:
        shutil.copy(f, folder)
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.png").write_bytes(good[0].read_bytes()[:200])
    table = reference.predict_paths([folder], top_k=2, workers=2)  # read in two worker processes
    assert len(table) == 5
    bad = table[table["error"] != ""]
    bad = bad.set_index(bad["path"].map(lambda p: Path(p).name))
    assert sorted(bad.index) == ["cut.png", "empty.png"] and bad.loc["empty.png", "error"].startswith("empty file")
    assert (bad["label_1"] == "").all() and bad[["prob_1", "prob_2"]].isna().all().all()
    alone = reference.predict_paths(good, top_k=2, workers=0)
    ok = table[table["error"] == ""].reset_index(drop=True)
    assert ok["label_1"].equals(alone["label_1"]) and np.allclose(ok["prob_1"], alone["prob_1"], atol=1e-6)

    out = tmp_path / "preds.csv"
    assert main(["predict", str(run.path), str(folder), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"2 unreadable files skipped ({err[0].split('(')[1].split(')')[0]}): listed in the error column "
                   f"of {out}"] and "empty file 1" in err[0]
    assert pd.read_csv(out)["error"].notna().sum() == 2
    assert main(["predict", str(run.path), str(folder), "--strict"]) == 2
    assert "--strict" in capsys.readouterr().err


def test_onnx_export_needs_only_the_core_install():
    """torch's ONNX exporter needs onnx, and export checks the model in onnxruntime: both come with `pip install .`."""
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "setup.cfg")
    lines = cfg["options"]["install_requires"].split()
    core = {re.split(r"[<>=!~\[;]", line)[0].lower() for line in lines}
    assert {"onnx", "onnxruntime"} <= core
