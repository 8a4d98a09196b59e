"""Multi-label data: CSV forms, checks, stratified splits, thresholds and scores."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from finetune import multilabel as ml
from finetune.data import DataError, scan, split

SETS = ["a;b", "a", "b;c", "", "a;c", "c", "a;b;c", "b", "a;b", "c;a", "b;c", "a", "", "b", "c;b", "a;c"] * 2


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
    return [f"im/im{i:02d}.png" for i in range(n)]


@pytest.fixture
def cell_csv(tmp_path):
    paths = _images(tmp_path / "im", len(SETS))
    pd.DataFrame({"path": paths, "labels": SETS}).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path / "labels.csv"


def test_cell_form_reads_label_sets_and_keeps_images_without_labels(cell_csv):
    sc = scan(cell_csv.parent, csv=cell_csv)
    assert sc.multilabel and sc.classes == ["a", "b", "c"]
    assert len(sc.items) == len(SETS) and (sc.items["label"] == "").sum() == SETS.count("")
    assert sc.items.set_index(sc.items["path"].str[-8:])["label"]["im09.png"] == "a;c"  # sorted set
    assert "images without a label" in sc.report() and "co-occurrence" in sc.report()


def test_column_form_gives_the_same_sets(tmp_path, cell_csv):
    sets = [set(s.split(";")) - {""} for s in SETS]
    cols = {c: [int(c in s) for s in sets] for c in "abc"}
    pd.DataFrame({"path": [f"im/im{i:02d}.png" for i in range(len(SETS))], **cols}).to_csv(tmp_path / "hot.csv",
                                                                                            index=False)
    a, b = scan(tmp_path, csv=tmp_path / "hot.csv"), scan(tmp_path, csv=cell_csv)
    assert a.multilabel and a.items["label"].tolist() == b.items["label"].tolist()


def test_split_keeps_every_label_on_both_sides(cell_csv):
    items = split(scan(cell_csv.parent, csv=cell_csv).items, 0.25, seed=0, multilabel=True)
    y = ml.matrix(items["label"], ["a", "b", "c"])
    val = (items["split"] == "val").to_numpy()
    assert 0.15 < val.mean() < 0.35
    share = y[val].sum(0) / y.sum(0)
    assert np.all(share > 0.1) and np.all(share < 0.45), share


def test_foreign_separator_is_refused_with_line_and_cell(tmp_path):
    paths = _images(tmp_path / "im", 3)
    pd.DataFrame({"path": paths, "labels": ["a;b", "a|b", "b"]}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(DataError, match=r"line 3: label cell 'a\|b' contains a bar .* 'a;b'"):
        scan(tmp_path, csv=tmp_path / "l.csv")


def test_duplicate_label_in_a_cell_and_singleton_labels_warn_and_lose_nothing(tmp_path):
    paths = _images(tmp_path / "im", 4)
    pd.DataFrame({"path": paths, "labels": ["a;a;b", "a", "b;rare", "a;b"]}).to_csv(tmp_path / "l.csv", index=False)
    sc = scan(tmp_path, csv=tmp_path / "l.csv")
    assert len(sc.items) == 4 and sc.items["label"].tolist()[0] == "a;b"
    text = "\n".join(sc.warnings)
    assert "line 2: label cell 'a;a;b' names a more than once" in text
    assert "label 'rare' appears on only 1 image" in text


def test_image_listed_twice_with_different_sets_is_reported_not_guessed(tmp_path):
    paths = _images(tmp_path / "im", 10)
    labels = ["a;b", "a", "b", "a;b", "a", "b", "a;b", "a", "b", "a;b"]
    pd.DataFrame({"path": paths + [paths[0]], "labels": labels + ["a"]}).to_csv(tmp_path / "l.csv", index=False)
    sc = scan(tmp_path, csv=tmp_path / "l.csv")
    assert len(sc.items) == 9  # every other row
    reasons = sc.bad["reason"].tolist()
    assert len(reasons) == 2 and all("conflicting labels: listed as a;b, a" in r for r in reasons)


def test_unknown_label_against_a_fixed_list(cell_csv):
    sc = scan(cell_csv.parent, csv=cell_csv, labels=["a", "b"], max_bad_fraction=1.0)
    assert sc.bad["reason"].str.contains("unknown label: 'c'").sum() == sum("c" in s for s in SETS)


def test_thresholds_maximise_each_labels_f1():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.8], [0.4, 0.7], [0.1, 0.3]])
    target = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])
    th = ml.best_thresholds(probs, target)
    assert th == pytest.approx([0.6, 0.7])  # the lowest probability of each label's positives
    metrics, table = ml.score(probs, target, ["x", "y"], th)
    assert metrics["macro_f1"] == 1.0 and metrics["map"] == 1.0 and metrics["exact_match"] == 1.0
    assert ml.decide(probs, [0.95, 0.95]).sum() == 0
    metrics, _ = ml.score(probs, target, ["x", "y"], [0.95, 0.95])
    assert metrics["macro_f1"] == 0.0 and metrics["map"] == 1.0  # AP does not depend on thresholds


def test_policy_counts_images_a_label():
    items = pd.DataFrame({"label": ["a;b", "a", "", "b"], "split": ["train", "train", "train", "val"]})
    assert ml.images_a_label(items, ["a", "b"]) == 1.5  # a: 2 training images, b: 1


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory, textures):
    """A multi-label run on scikit-image's textures: brick = rough;red, grass = green;soft, gravel = rough;grey."""
    from finetune import fit
    sets = {"brick": "red;rough", "grass": "green;soft", "gravel": "grey;rough"}
    rows = [(str(p.relative_to(textures)), sets[p.parent.name]) for p in sorted(textures.rglob("*.png"))]
    csv = tmp_path_factory.mktemp("ml") / "labels.csv"
    pd.DataFrame(rows, columns=["path", "labels"]).to_csv(csv, index=False)
    run = fit(textures, "natural", csv=csv, out=tmp_path_factory.mktemp("runs"), name="ml", progress=False,
              overrides=["train.epochs=2", "image.size=32", "train.num_workers=0"])
    return run, csv


def test_fit_multilabel_trains_sigmoid_outputs_and_keeps_thresholds(ml_run):
    from finetune.run import load_checkpoint
    run, _ = ml_run
    assert run.recipe.train.labels == "multi" and run.classes == ["green", "grey", "red", "rough", "soft"]
    assert run.summary["best_metric"] == "val_map"
    assert "images a class (multi-label: the mean number" in (run.path / "plan.txt").read_text()
    ckpt = load_checkpoint(run.checkpoint("best"))
    th = ckpt["finetune"]["thresholds"]
    assert len(th) == 5 and all(0 < t < 1 for t in th)
    assert ckpt["state_dict"]["model.classifier.weight"].shape[0] == 5


def test_multilabel_round_trip_evaluate_predict_export(ml_run, tmp_path):
    from finetune.evaluate import evaluate
    from finetune.export import export
    from finetune.predict import Predictor
    run, _ = ml_run
    ev = evaluate(run)
    assert ev.multilabel and set(ev.per_class["label"]) == set(run.classes)
    assert 0 <= ev.metrics["map"] <= 1 and "mean average precision" in ev.to_string()
    for pic in ("per_label.png", "pr_curves.png", "threshold_f1.png", "cooccurrence.png", "wrong.png"):
        assert (ev.folder / pic).stat().st_size > 1000
    html = (ev.folder / "report.html").read_text()
    assert "mean average precision" in html and "co-occurrence" in html.lower() and "No evaluation yet" not in html

    pred = Predictor.load(run.path)
    val = run.items[run.items["split"] == "val"]["path"].tolist()[:6]
    table = pred.predict_paths(val)
    assert list(table.columns) == ["path", "labels", *[f"prob_{c}" for c in run.classes], "error"]
    probs = table[[f"prob_{c}" for c in run.classes]].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all() and not np.allclose(probs.sum(1), 1)  # sigmoid, not softmax
    for row, p in zip(table["labels"], probs):
        assert (row.split(";") if row else []) == [c for c, v, t in zip(run.classes, p, pred.thresholds) if v >= t]

    folder = export(run, "onnx", out=tmp_path / "onnx")
    meta = __import__("json").loads((folder / "export.json").read_text())
    assert meta["thresholds"] == pred.thresholds
    exported = Predictor.load(folder)
    assert exported.thresholds == pred.thresholds
    again = exported.predict_paths(val)
    assert np.abs(again[[f"prob_{c}" for c in run.classes]].to_numpy() - probs).max() < 1e-4
    assert again["labels"].tolist() == table["labels"].tolist()
