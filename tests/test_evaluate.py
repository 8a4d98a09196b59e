"""evaluate: metrics against hand computations, the run's own numbers, folders that are never overwritten."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torchmetrics.classification import MulticlassCalibrationError

from finetune import evaluate as evaluate_module
from finetune import plots
from finetune.cli import main
from finetune.evaluate import PICTURES, Evaluation, evaluate, score
from finetune.report import notes



@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def ev(run):
    return evaluate(run)


def test_own_val_split_reproduces_the_training_scores(run, ev):
    assert ev.folder == run.path / "eval-tex-val" and ev.split == "val" and ev.metrics["n"] == 48
    best = run.metrics().set_index("epoch").loc[0]  # one epoch: the best is the only one
    assert ev.metrics["accuracy"] == pytest.approx(run.summary["best_score"], abs=1e-5)
    assert ev.metrics["balanced_accuracy"] == pytest.approx(best["val_recall"], abs=1e-5)
    assert ev.metrics["top1_error"] == pytest.approx(1 - ev.metrics["accuracy"])
    assert ev.metrics["top5_error"] is None  # 3 classes: top-5 says nothing
    assert ev.per_class["n_train"].tolist() == [48, 48, 48] and ev.per_class["support"].tolist() == [16, 16, 16]
    assert ev.confusion.sum() == 48 and ev.per_class["predicted"].sum() == 48
    assert ev.metrics["train_overlap"] == 0 and ev.metrics["bad_files"] == 0 and ev.warnings == []


def test_folder_holds_tables_and_pictures_that_decode(ev):
    names = {p.name for p in ev.folder.iterdir()}
    assert set(PICTURES) | {"metrics.json", "per_class.csv", "confusion.csv", "predictions.csv", "report.html"} <= names
    for name in PICTURES:
        with Image.open(ev.folder / name) as im:
            im.verify()
        with Image.open(ev.folder / name) as im:
            assert im.width > 300 and im.height > 200
            assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas
    preds = pd.read_csv(ev.folder / "predictions.csv")
    assert len(preds) == 48 and preds["correct"].mean() == pytest.approx(ev.metrics["accuracy"])
    probs = preds[[f"p_{c}" for c in ev.classes]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4) and np.allclose(probs.max(1), preds["confidence"], atol=1e-6)
    loaded = Evaluation.load(ev.folder)
    assert loaded.metrics == json.loads((ev.folder / "metrics.json").read_text())["metrics"]
    assert (loaded.confusion == ev.confusion).all() and loaded.per_class["class"].tolist() == ev.classes


def test_a_second_evaluation_never_overwrites_the_first(run, ev):
    before = {p.name: p.read_bytes() for p in ev.folder.iterdir()}
    again = evaluate(run, checkpoint="last", report=False)
    assert again.folder.name == "eval-tex-val-2"
    assert {p.name: p.read_bytes() for p in ev.folder.iterdir()} == before


def test_external_folder_split_choice_and_unknown_labels(run, textures, tmp_path):
    ev = evaluate(run, textures, split="train", report=False, workers=1)
    assert ev.folder.name == "eval-tex-train" and ev.metrics["n"] == 144
    # the run's own training images: said on the console, in metrics.json and in the report's notes
    warning = ("144 of the 144 evaluated images are in the run's own training split: these scores overstate how it "
               "does on images it has not seen")
    assert ev.metrics["train_overlap"] == 144 and ev.warnings == [warning]
    assert ev.to_string().splitlines()[0] == f"warning: {warning}"
    assert Evaluation.load(ev.folder).warnings == [warning]
    assert any("144 of the 144 evaluated images" in n for n in notes(run, ev))
    with pytest.raises(ValueError, match="split 'test' has no images"):
        evaluate(run, textures, split="test")
    odd = tmp_path / "odd"
    for label in ("brick", "sand"):
        (odd / label).mkdir(parents=True)
        for f in sorted((textures / "val" / "brick").iterdir())[:2]:
            (odd / label / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="sand"):
        evaluate(run, odd)


def test_score_matches_hand_computed_metrics():
    rng = np.random.default_rng(0)
    c, n = 7, 300
    target = rng.integers(0, c - 1, n)  # class 6 never occurs: precision/recall of an absent class
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[target] * rng.random((n, 1))
    probs = torch.tensor(logits).softmax(-1).float()
    metrics, table, cm = score(probs, torch.tensor(target), [f"c{i}" for i in range(c)], n_bins=10)
    pred = probs.argmax(-1).numpy()
    assert metrics["accuracy"] == pytest.approx((pred == target).mean())
    top5 = np.argsort(-probs.numpy(), axis=1)[:, :5]
    assert metrics["top5_error"] == pytest.approx(1 - (top5 == target[:, None]).any(1).mean())
    assert (cm == confusion_matrix(target, pred, labels=range(c))).all()
    p, r, f, s = precision_recall_fscore_support(target, pred, labels=range(c), zero_division=0)
    assert np.allclose(table["precision"], p, atol=1e-6) and np.allclose(table["recall"], r, atol=1e-6)
    assert np.allclose(table["f1"], f, atol=1e-6) and (table["support"] == s).all()
    assert metrics["balanced_accuracy"] == pytest.approx(r[s > 0].mean(), abs=1e-6)
    assert metrics["majority_accuracy"] == pytest.approx(s.max() / n)
    # the reliability diagram's bins give torchmetrics' ECE
    conf = probs.max(-1).values.numpy()
    bins = plots.reliability_bins(conf, pred == target, 10)
    ece = np.nansum(bins["count"] * (bins["accuracy"] - bins["confidence"]).abs()) / n
    assert ece == pytest.approx(metrics["ece"], abs=1e-6)
    assert metrics["ece"] == pytest.approx(float(MulticlassCalibrationError(c, n_bins=10)(probs, torch.tensor(target))))


def test_cli_evaluate_prints_the_short_table(run, capsys):
    assert main(["evaluate", str(run.path), "--split", "val", "--tta"]) == 0
    out = capsys.readouterr().out
    assert "top-1 error" in out and "balanced accuracy" in out and "gravel" in out and "report.html" in out
    assert main(["evaluate", str(run.path), "--split", "nope"]) == 2


def test_unreadable_files_are_skipped_listed_and_announced(run, textures, tmp_path, capsys):
    data = tmp_path / "new"
    for c in ("brick", "grass", "gravel"):
        shutil.copytree(textures / "val" / c, data / c)
    (data / "grass" / "empty.png").write_bytes(b"")
    (data / "gravel" / "cut.png").write_bytes((data / "gravel" / "gravel_000.png").read_bytes()[:150])
    assert main(["evaluate", str(run.path), str(data), "--workers", "1"]) == 0
    folder = run.path / "eval-new-all"
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 2 unreadable files skipped (")
    assert warnings[0].endswith(f"): listed in {folder / 'bad_files.csv'}")  # copies: no training images
    bad = pd.read_csv(folder / "bad_files.csv")
    assert sorted(bad["path"].map(lambda p: p.rsplit("/", 1)[-1])) == ["cut.png", "empty.png"]
    record = json.loads((folder / "metrics.json").read_text())
    assert record["metrics"]["n"] == 48 and record["metrics"]["bad_files"] == 2
    assert record["warnings"] == [warnings[0][len("warning: "):]]


def test_a_file_broken_after_the_scan_is_skipped_by_the_loader(run, textures, tmp_path, monkeypatch):
    data = tmp_path / "late"
    for c in ("brick", "grass", "gravel"):
        shutil.copytree(textures / "val" / c, data / c)
    victim = sorted((data / "brick").iterdir())[0]
    real_scan = evaluate_module.scan

    def scan_then_break(*args, **kwargs):  # the file changes between the scan and the loader
        found = real_scan(*args, **kwargs)
        victim.write_bytes(b"")
        return found

    monkeypatch.setattr(evaluate_module, "scan", scan_then_break)
    ev = evaluate(run, data, report=False, workers=0)
    assert ev.metrics["n"] == 47 and ev.metrics["bad_files"] == 1 and ev.confusion.sum() == 47
    bad = pd.read_csv(ev.folder / "bad_files.csv")
    assert bad["path"].tolist() == [str(victim)] and bad["reason"][0].startswith("empty file")
    assert str(victim) not in pd.read_csv(ev.folder / "predictions.csv")["path"].tolist()
