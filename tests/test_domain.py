"""Distance to ImageNet (finetune.domain): ordering on real images, bounds, zero-variance channels, stage keys,
the no-BatchNorm error, and ~0 when the data's statistics are the BN statistics themselves."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import domain
from finetune.backbone import create_backbone
from finetune.recipe import Recipe
from finetune.stages import stages

LITE0_STAGES = ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5",
                "blocks.6+conv_head+bn2"]


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("tf_efficientnet_lite0", num_classes=0)


def quadrants(a):
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return [a[:h, :w], a[:h, w:], a[h:, :w], a[h:, w:]]


@pytest.fixture(scope="module")
def photos():
    import skimage.data as skd
    return [skd.chelsea(), skd.coffee(), skd.astronaut(), skd.rocket()]


@pytest.fixture(scope="module")
def scores(lite0, photos):
    """Reports for four ImageNet-like photos and four far images of each kind, at the model's own 224 px."""
    import skimage.data as skd
    from sklearn.datasets import load_digits
    sets = {"photos": photos, "cell": quadrants(skd.cell()), "ihc": quadrants(skd.immunohistochemistry()),
            "digits": list((load_digits().images[:4] / 16).astype(np.float32))}
    return {k: domain.distance(lite0, domain.prepare(v, lite0)) for k, v in sets.items()}


def test_photos_score_lower_than_microscopy_histology_and_digits(scores):
    near = scores["photos"]
    for far in ("cell", "ihc", "digits"):
        assert near.raw < scores[far].raw, far
        assert near.overall < scores[far].overall, far
    # the calibrated scale: photos low, the cell micrograph and digits high
    assert near.overall < 0.25
    assert scores["cell"].overall > 0.6 and scores["digits"].overall > 0.5


def test_scores_and_stages_are_in_unit_interval(scores, lite0):
    extremes = {"constant": torch.zeros(2, 3, 64, 64), "noise": torch.randn(2, 3, 64, 64) * 5}
    reports = list(scores.values()) + [domain.distance(lite0, x) for x in extremes.values()]
    for r in reports:
        values = [r.overall, r.raw, *r.per_stage.values(), *r.per_layer.values()]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), r
    assert reports[-1].raw > scores["photos"].raw  # noise is farther than photos


def test_per_stage_keys_are_the_stage_names(scores, lite0):
    assert list(scores["photos"].per_stage) == LITE0_STAGES
    assert LITE0_STAGES == [s.name for s in stages(lite0)]
    assert len(scores["photos"].per_layer) == sum(1 for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d))
    r = scores["photos"]
    assert r.raw == pytest.approx(sum(r.per_stage.values()) / len(r.per_stage))


def test_stage_keys_on_another_architecture():
    import timm
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    r = domain.distance(model, torch.randn(2, 3, 32, 32))
    assert list(r.per_stage) == [s.name for s in stages(model) if s.kind != "head"]
    assert r.model == "resnet18"


class ConvBN(torch.nn.Module):
    """A 1x1 convolution then BatchNorm: the BN's input statistics can be computed from the data exactly."""

    def __init__(self, channels=2, eps=1e-5):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, channels, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(channels, eps=eps)

    def forward(self, x):
        return self.bn(self.conv(x))

    def match(self, x):
        """Set the BN running statistics to the statistics of its input on ``x``."""
        with torch.no_grad():
            y = self.conv(x).double()
            self.bn.running_mean.copy_(y.mean((0, 2, 3)))
            self.bn.running_var.copy_(y.var((0, 2, 3), correction=0))
        return self


def test_data_equal_to_bn_statistics_scores_zero():
    x = torch.randn(10, 3, 8, 8) * 2 + 1
    model = ConvBN(4).match(x)
    assert domain.distance(model, x).raw < 1e-9
    assert domain.distance(model, x).overall == 0.0
    assert domain.distance(model, x + 3).raw > 0.3  # the same model sees shifted data as far


def test_streaming_batches_equal_one_batch_and_model_untouched():
    x = torch.randn(10, 3, 8, 8)
    model = ConvBN(4).match(torch.randn(10, 3, 8, 8) + 0.5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    whole = domain.distance(model, x, batch_size=10)
    parts = domain.distance(model, x, batch_size=3)
    loader = [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(6))]  # DataLoader-style (x, y) batches
    assert parts.raw == pytest.approx(whole.raw, abs=1e-9)
    assert domain.distance(model, loader).raw == pytest.approx(whole.raw, abs=1e-9)
    assert domain.distance(model, x, batch_size=3, max_images=5).n_images == 5
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_zero_variance_channels_are_skipped():
    x = torch.randn(6, 3, 8, 8)
    model = ConvBN(2, eps=0.0).match(x)
    with torch.no_grad():  # a pruned channel: variance exactly 0, mean far from the data's
        model.bn.running_var[1] = 0.0
        model.bn.running_mean[1] = 50.0
    r = domain.distance(model, x)
    assert math.isfinite(r.raw) and r.raw < 1e-9  # channel 1 left out, channel 0 matches
    with torch.no_grad():
        model.bn.running_var.zero_()  # nothing left to compare in the only layer
    with pytest.raises(ValueError, match="no BatchNorm channel"):
        domain.distance(model, x)


def test_pretrained_checkpoint_with_pruned_channels_is_finite(lite0, scores):
    assert any((m.running_var == 0).any() for m in domain.bn_layers(lite0).values())
    assert all(math.isfinite(v) for v in scores["photos"].per_layer.values())


def test_model_without_batchnorm_raises_a_clear_error():
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=2)
    with pytest.raises(domain.NoBatchNormError, match="BatchNorm") as e:
        domain.distance(vit, torch.randn(1, 3, 32, 32))
    assert domain.REFERENCE in str(e.value)


def test_measure_folder_matches_prepare_and_skips_broken_files(tmp_path, lite0, photos):
    recipe = Recipe().override({"image.size": 96})  # small input: fast
    tiles = [t for p in photos[:2] for t in quadrants(p)]
    for i, t in enumerate(tiles):
        folder = tmp_path / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(t).save(folder / f"{i}.png")
    good = (tmp_path / "a" / "1.png").read_bytes()
    (tmp_path / "a" / "broken.png").write_bytes(good[:len(good) // 2])  # a valid header, truncated pixels
    r = domain.measure_folder(tmp_path, recipe, model=lite0, max_images=100, batch_size=3)
    assert r.n_images == len(tiles)
    expected = domain.distance(lite0, domain.prepare(tiles, lite0, recipe=recipe))  # pooled: order does not matter
    assert r.raw == pytest.approx(expected.raw, abs=1e-6)
    assert domain.measure_folder(tmp_path, recipe, model=lite0, max_images=3).n_images == 3


def test_report_prints_score_and_stages(scores):
    r = scores["photos"]
    text = r.to_string()
    assert f"{r.overall:.2f}" in text and all(name in text for name in LITE0_STAGES)
    rows = r.table()
    assert [row["stage"] for row in rows] == LITE0_STAGES + ["overall"]
    assert rows[-1]["calibrated"] == round(r.overall, 4)


def test_calibration_is_clipped_affine():
    low, high = domain.CALIBRATION[domain.REFERENCE]
    assert domain.calibrate(low) == 0.0 and domain.calibrate(high) == 1.0
    assert domain.calibrate(-1.0) == 0.0 and domain.calibrate(2.0) == 1.0
    assert domain.calibrate((low + high) / 2) == pytest.approx(0.5)
