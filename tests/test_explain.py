"""Class-activation maps: on the cat for an ImageNet model, token maps of ViTs on their patch grid, 16-bit gray
images shown as the model read them, the CLI's PNGs and table, and one line when grad-cam is missing."""
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from finetune.cli import main
from finetune.explain import Explainer, _spatial
from finetune.predict import Predictor, TorchBackend
from finetune.recipe import load_recipe
from finetune.train import _preprocess

pytest.importorskip("pytorch_grad_cam")


def _predictor(model, recipe):
    return Predictor([str(i) for i in range(model.num_classes)], _preprocess(recipe, model, None),
                     TorchBackend(model, "cpu"))


def test_gradcam_mass_lies_on_the_cat(one_thread):
    from skimage.data import chelsea
    from finetune.backbone import create_backbone
    model = create_backbone("tf_efficientnet_lite0", 1000)  # ImageNet's head kept
    explainer = Explainer(_predictor(model, load_recipe("natural")))
    canvas = np.full((224, 224, 3), 0.5, np.float32)
    canvas[112:, 112:] = np.asarray(Image.fromarray(chelsea()).resize((112, 112)), np.float32) / 255  # bottom right
    x = (torch.from_numpy(canvas).permute(2, 0, 1) - 0.5) / 0.5  # this network's mean and std are 0.5
    (cam,) = explainer(x[None])
    assert cam.shape == (224, 224) and cam.max() == pytest.approx(1.0, abs=1e-3)
    assert cam[112:, 112:].sum() / cam.sum() > 0.6  # a uniform map puts 0.25 there (measured 0.68)


def test_vit_tokens_are_laid_out_on_the_patch_grid(one_thread):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=64)
    tokens = torch.arange(17.0).view(1, 17, 1).expand(1, 17, 192)  # class token, then 4x4 patches row by row
    grid = _spatial(vit)(tokens)
    assert grid.shape == (1, 192, 4, 4) and grid[0, 0, 1, 2] == 1 + 1 * 4 + 2
    maps = Explainer(_predictor(vit, load_recipe("natural", ["image.size=64"])), "gradcam++")(torch.randn(2, 3, 64, 64))
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()


def test_sixteen_bit_gray_is_shown_as_the_model_read_it(tmp_path):
    dim = (np.linspace(1000, 3000, 64 * 64).reshape(64, 64)).astype(np.uint16)  # 2-5% of the 16-bit range
    Image.fromarray(dim).save(tmp_path / "dim.png")
    recipe = load_recipe("microscopy", ["image.size=64"])  # per-image percentile scaling
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    explainer = Explainer(_predictor(model, recipe))
    ((view, overlay),) = explainer.overlays([tmp_path / "dim.png"])
    assert view.shape == overlay.shape == (64, 64, 3)
    assert view.min() < 0.02 and view.max() > 0.98  # stretched as in training, not the file's near-black
    assert np.allclose(view, view[..., :1], atol=1e-5)  # still gray


def test_explain_writes_overlays_beside_the_top_k_answers(tiny_run, textures, tmp_path, capsys):
    images = sorted((textures / "val" / "brick").iterdir())[:2] if (textures / "val").is_dir() else \
        sorted((textures / "brick").iterdir())[:2]
    out = tmp_path / "cams"
    assert main(["explain", str(tiny_run.path), *map(str, images), "--top-k", "2", "--out", str(out)]) == 0
    import pandas as pd
    table = pd.read_csv(out / "explain.csv")
    assert list(table.columns) == ["path", "label_1", "prob_1", "label_2", "prob_2", "overlay"] and len(table) == 2
    for f in table["overlay"]:
        im = np.asarray(Image.open(f))
        assert im.shape == (32, 64, 3) and not np.array_equal(im[:, :32], im[:, 32:])  # the image, then its map
    assert main(["explain", str(tiny_run.path), str(images[0]), "--out", str(out)]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err


def test_missing_grad_cam_names_the_extra(tiny_run, textures, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    assert main(["explain", str(tiny_run.path), str(textures)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'finetune[explain]'" in err
