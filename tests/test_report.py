"""The HTML report: one file, every picture inline and decodable, rendered by headless Chromium where there is
one; imbalance spelled out; never overwritten. Plus the pictures that read the run's logs."""
import base64
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from finetune import fit, plots
from finetune.evaluate import Evaluation, evaluate
from finetune.examples import texture_folder
from finetune.report import notes, write_report
from finetune.run import Run

TINY = ["train.epochs=2", "image.size=32", "train.num_workers=0"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = texture_folder(tmp_path_factory.mktemp("data") / "tex")
    return fit(data, "natural", out=tmp_path_factory.mktemp("runs"), name="r", overrides=TINY, progress=False)


@pytest.fixture(scope="module")
def ev(run):
    return evaluate(run)


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.links = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        for k in ("href", "src"):
            if k in a and tag != "img":
                self.links.append(a[k])


def _images(page: str) -> list[Image.Image]:
    p = Images()
    p.feed(page)
    assert not p.links, f"the report must be self-contained, found {p.links}"
    out = []
    for src in p.srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        im.load()
        out.append(im)
    return out


def _n_pictures(ev) -> int:
    """per-class, confusion, calibration, wrong, class counts, curves; with grad-cam the maps of the mistakes and
    of correct images"""
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        return 6
    correct = pd.read_csv(ev.folder / "predictions.csv")["correct"]
    return 6 + int((~correct).any()) + int(correct.any())


def test_report_is_one_file_with_every_picture_inline(run, ev):
    page = (ev.folder / "report.html").read_text()
    images = _images(page)
    assert len(images) == _n_pictures(ev)
    assert (len(images) > 6) == ("Where the model looked, 2 correct images a class" in page)
    assert (len(images) == 6) == ("pip install 'finetune[explain]'" in page)
    # a real picture each: wide enough for one titled image (a grid of one mistake is 300 px), not blank
    assert all(im.width >= 250 and np.asarray(im.convert("L")).std() > 5 for im in images)
    plan = (run.path / "plan.txt").read_text()
    assert html.escape(plan.splitlines()[0]) in page  # the freeze plan and its reasons
    assert "lr: 0.001" in page and "label_smoothing" in page  # the recipe
    text = re.sub(r"<[^>]+>", " ", page)
    for c in ev.classes:  # class counts per split: train 48, val 16 for each class
        assert re.search(rf"{c}\s+48\s+16\s+64", text), c
    assert f"{ev.metrics['accuracy']:.3f}" in text and "balanced accuracy" in text


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(ev, tmp_path):
    page = (ev.folder / "report.html").read_text()
    probe = ("<script>addEventListener('load',()=>{document.body.dataset.imgs=JSON.stringify("
             "[...document.images].map(i=>[i.complete,i.naturalWidth,i.naturalHeight]))})</script>")
    probed = tmp_path / "probe.html"
    probed.write_text(page.replace("</body>", probe + "</body>"))
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'data-imgs="([^"]*)"', dom.stdout)
    assert found, dom.stderr[-2000:]
    sizes = json.loads(html.unescape(found.group(1)))
    assert len(sizes) == _n_pictures(ev) and all(done and w > 0 and h > 0 for done, w, h in sizes), sizes
    shot = tmp_path / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,3000", (ev.folder / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (3000, 1200)
    not_white = (pixels < 235).any(-1).mean()
    assert not_white > 0.05 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # text, bars and photos


def test_report_of_a_run_without_evaluation_and_never_overwritten(run, tmp_path):
    bare = Run(shutil.copytree(run.path, tmp_path / "bare", ignore=shutil.ignore_patterns("eval-*", "*.ckpt")))
    first, second = write_report(bare), write_report(bare)
    assert (first.name, second.name) == ("report.html", "report-2.html")
    page = first.read_text()
    assert len(_images(page)) == 2 and "No evaluation yet" in page  # class counts and curves, made on the fly
    with pytest.raises(FileExistsError):
        write_report(bare, out=first)


def test_notes_spell_out_imbalance_and_its_effect(run, ev, tmp_path):
    skewed = Run(shutil.copytree(run.path, tmp_path / "skewed", ignore=shutil.ignore_patterns("eval-*", "*.ckpt")))
    items = skewed.items
    drop = items[(items["split"] == "train") & (items["label"] == "gravel")].index[4:]
    items.drop(drop).to_csv(skewed.path / "items.csv", index=False)  # gravel: 4 training images against 48
    table = pd.DataFrame({"class": ev.classes, "n_train": [48, 48, 4], "support": [100, 100, 10],
                          "predicted": [105, 103, 2], "precision": [0.9, 0.9, 1.0], "recall": [0.95, 0.93, 0.2],
                          "f1": [0.92, 0.91, 0.33]})
    cm = np.array([[95, 5, 0], [7, 93, 0], [3, 5, 2]])
    metrics = dict(ev.metrics, accuracy=190 / 210, balanced_accuracy=(0.95 + 0.93 + 0.2) / 3, majority_class="brick",
                   majority_accuracy=100 / 210, ece=0.12)
    fake = Evaluation(folder=ev.folder, run=skewed.path, data="tex", split="val", checkpoint="x", classes=ev.classes,
                      metrics=metrics, per_class=table, confusion=cm)
    text = " ".join(re.sub(r"<[^>]+>", "", n) for n in notes(skewed, fake))
    assert "Imbalanced training data" in text and "12.0x fewer" in text and "loss.balance: none" in text
    assert "freeze plan was chosen for 48 images a class on average; the rarest class has 4" in text
    assert "Weakest class (lowest F1): gravel. 20% of its 10 images are found" in text
    assert "100% of the 2 images called gravel are gravel (precision); most of its misses (5 of 8) are called grass" in text
    assert "always answering brick would score 0.476" in text
    balanced = " ".join(notes(run, ev))
    assert "balanced (48 to 48 images a class)" in balanced and "Imbalanced" not in balanced


def test_notes_name_false_alarms_when_precision_is_the_problem(run, ev):
    cm = np.array([[68, 0, 1], [3, 780, 22], [0, 0, 71]])  # BCCD-like: the rare class gets the common one's errors
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    precision, recall = tp / predicted, tp / support
    table = pd.DataFrame({"class": ev.classes, "support": support, "predicted": predicted, "precision": precision,
                          "recall": recall, "f1": 2 * precision * recall / (precision + recall)})
    metrics = dict(ev.metrics, accuracy=tp.sum() / cm.sum(), balanced_accuracy=recall.mean(), ece=0.02)
    fake = Evaluation(folder=ev.folder, run=run.path, data="tex", split="val", checkpoint="x", classes=ev.classes,
                      metrics=metrics, per_class=table, confusion=cm)
    text = " ".join(re.sub(r"<[^>]+>", "", n) for n in notes(run, fake))
    assert "Weakest class (lowest F1): gravel. 100% of its 71 images are found" in text
    assert "76% of the 94 images called gravel are gravel (precision)" in text
    assert "most of the wrong gravel calls (22 of 23) are grass images" in text
    assert "confidences match" in text


def test_curves_show_each_trained_groups_learning_rate(run):
    log = plots.read_logs(run.path)
    groups = [g.name for g in run.plan.groups]
    fig = plots.curves(log, groups)
    ax_lr = fig.axes[2]
    trained = [g.name for g in run.plan.groups if g.train_from is not None]
    assert [line.get_label() for line in ax_lr.get_lines()] == trained
    fixed = [g.name for g in run.plan.groups if g.train_from is None]
    assert fixed and all(name in ax_lr.texts[0].get_text().replace("\n", " ") for name in fixed)
    head = ax_lr.get_lines()[trained.index("head")].get_ydata()
    assert np.nanmax(head) == pytest.approx(run.recipe.optim.lr)  # after warm-up the head runs at optim.lr
    assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()] == [2, 2]  # train and val loss, 2 epochs


def test_freeze_grid_reads_both_table_shapes():
    bench = pd.DataFrame({"dataset": ["a"] * 4, "per_class": [10] * 4, "plan": ["fixed0", "fixed4", "fixed8", "auto"],
                          "fixed_depth": [0, 4, 8, 4], "val_acc": [0.5, 0.7, 0.6, 0.72]})
    small = pd.DataFrame({"dataset": ["a", "a", "b", "b"], "per_class": [5, 5, 5, 5], "depth": [0, "auto", 0, "auto"],
                          "val_acc": [0.4, 0.5, 0.6, 0.55]})
    fig = plots.freeze_grid(bench)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 and list(lines[0].get_xdata()) == [0, 4, 8] and list(lines[1].get_xdata()) == [4]
    fig = plots.freeze_grid(small)
    assert len([ax for ax in fig.axes if ax.get_title()]) == 2
    assert [ln.get_ydata()[0] for ln in fig.axes[1].get_lines()] == [0.6, 0.55]  # auto without a depth: a level


def test_notes_of_a_class_never_predicted_and_of_evaluation_warnings(run, ev):
    cm = np.array([[16, 0, 0], [0, 16, 0], [9, 7, 0]])  # gravel is never predicted
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    table = pd.DataFrame({"class": ev.classes, "support": support, "predicted": predicted,
                          "precision": [16 / 25, 16 / 23, 0.0], "recall": tp / support, "f1": [0.78, 0.82, 0.0]})
    fake = Evaluation(folder=ev.folder, run=run.path, data="tex", split="val", checkpoint="x", classes=ev.classes,
                      metrics=dict(ev.metrics, ece=0.02), per_class=table, confusion=cm,
                      warnings=["48 of the 48 evaluated images are in the run's own training split: these scores "
                                "overstate how it does on images it has not seen"])
    text = html.unescape(" ".join(re.sub(r"<[^>]+>", "", n) for n in notes(run, fake)))
    assert "0% of its 16 images are found (recall) and no image is called gravel (precision)" in text
    assert "of the 0 images" not in text
    assert "48 of the 48 evaluated images are in the run's own training split" in text


def test_report_says_how_to_get_the_maps_without_grad_cam(run, ev, monkeypatch):
    import sys
    from finetune.report import render
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    page = render(run, ev)
    assert "pip install &#x27;finetune[explain]&#x27;" in page and len(_images(page)) == 6
