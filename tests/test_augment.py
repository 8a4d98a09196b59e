"""Augmentation pipelines: data config, shapes for 1/3/N channels, early errors, JSON round trips, 16-bit precision."""
import functools
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from finetune import augment
from finetune.augment import A  # albumentations, through the one module that imports it
from finetune.recipe import RECIPE_DIR, RecipeError, load_recipe

SHIPPED = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
FOUR_CHANNELS = {"image.channels": 4, "image.stem": "adapt"}


@functools.lru_cache(maxsize=None)
def model(name="tf_efficientnet_lite0", in_chans=3):
    return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=2)


def pipelines(recipe, backbone=None):
    config = augment.data_config(recipe, model(backbone or recipe.backbone.name, augment.model_channels(recipe)))
    return config, augment.build_transforms(recipe, config, True), augment.build_transforms(recipe, config, False)


def image(recipe, h=300, w=260, seed=0):
    return np.random.default_rng(seed).random((h, w, augment.read_channels(recipe)), dtype=np.float32)


def run(pipeline, img, seed=None):
    if seed is not None:
        pipeline.set_random_seed(seed)  # albumentations 2 draws from the Compose's own generators, not np.random
    return pipeline(image=img)["image"]


def leaves(specs, where="augment.transforms"):
    """(where, spec) for each entry and each child of a OneOf/SomeOf."""
    out = []
    for i, spec in enumerate(specs):
        out.append((f"{where}[{i}]", spec))
        out += leaves(spec.get("transforms", []), f"{where}[{i}].transforms")
    return out


# --- every shipped recipe ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_pipelines_give_the_model_input_shape(name):
    recipe = load_recipe(name)
    augment.check_transforms(recipe, name)
    config, train, evaluate = pipelines(recipe)
    c, h, w = config["input_size"]
    assert c == augment.model_channels(recipe) == augment.read_channels(recipe)
    for pipeline in (train, evaluate):
        for shape in ((300, 260), (150, 500)):
            out = run(pipeline, image(recipe, *shape), seed=1)
            assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
            assert tuple(out.shape) == (c, h, w) == (c, 224, 224)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["microscopy", "fluorescence"])
def test_microscopy_pipelines_take_four_channels(name):
    recipe = load_recipe(name, FOUR_CHANNELS)
    augment.check_transforms(recipe, name)
    _, train, evaluate = pipelines(recipe)
    img = image(recipe)
    assert img.shape[-1] == 4
    assert tuple(run(train, img, seed=0).shape) == tuple(run(evaluate, img).shape) == (4, 224, 224)


@pytest.mark.parametrize("name, transform", [("natural", "ColorJitter"), ("histology", "HEStain")])
def test_colour_transform_on_four_channels_is_an_early_error(name, transform):
    recipe = load_recipe(name, FOUR_CHANNELS)
    with pytest.raises(RecipeError) as e:
        augment.check_transforms(recipe, f"{name}.yaml")
    message = str(e.value)
    assert f"({transform})" in message and "4-channel" in message and "channel-agnostic" in message
    _, train, _ = pipelines(recipe)
    next(t for t in train.transforms if type(t).__name__ == transform).p = 1.0  # without the check: fails mid-training
    with pytest.raises((TypeError, ValueError)):
        run(train, image(recipe), seed=0)


def test_one_channel_adapted_stem_sees_one_channel():
    recipe = load_recipe("fluorescence")
    assert (augment.read_channels(recipe), augment.model_channels(recipe)) == (1, 1)
    assert (augment.read_channels(load_recipe("microscopy")), augment.model_channels(load_recipe("microscopy"))) == (3, 3)


# --- data config ------------------------------------------------------------------------------------------------

def test_natural_uses_the_backbones_data_config():
    recipe = load_recipe("natural")
    timm_cfg = timm.data.resolve_model_data_config(model("tf_efficientnet_lite0"))
    config = augment.data_config(recipe, model("tf_efficientnet_lite0"))
    assert config == {"input_size": (3, 224, 224), "mean": tuple(timm_cfg["mean"]), "std": tuple(timm_cfg["std"]),
                      "crop_pct": timm_cfg["crop_pct"], "interpolation": timm_cfg["interpolation"]}
    assert (config["mean"], config["crop_pct"], config["interpolation"]) == ((0.5, 0.5, 0.5), 0.875, "bicubic")
    other = augment.data_config(recipe, model("resnet18"))  # follows the model, not a fixed table
    assert other["mean"] == pytest.approx(IMAGENET_DEFAULT_MEAN) and other["crop_pct"] == 0.95


def test_recipe_image_values_override_the_backbones():
    recipe = load_recipe("natural", {"image.size": 160, "image.crop_pct": 0.9, "image.interpolation": "bilinear",
                                     "image.mean": [0.1, 0.2, 0.3], "image.std": [0.5]})
    config = augment.data_config(recipe, model("resnet18"))
    assert config == {"input_size": (3, 160, 160), "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5),
                      "crop_pct": 0.9, "interpolation": "bilinear"}
    _, train, evaluate = pipelines(recipe)
    assert tuple(run(train, image(recipe), seed=0).shape) == tuple(run(evaluate, image(recipe)).shape) == (3, 160, 160)


@pytest.mark.parametrize("overrides, n", [({}, 1), (FOUR_CHANNELS, 4)])
def test_adapted_stem_uses_the_average_rgb_statistics(overrides, n):
    recipe = load_recipe("fluorescence", overrides)
    config = augment.data_config(recipe, model("resnet18", n))
    assert config["input_size"][0] == n
    assert config["mean"] == pytest.approx([np.mean(IMAGENET_DEFAULT_MEAN)] * n)
    assert config["std"] == pytest.approx([np.mean(IMAGENET_DEFAULT_STD)] * n)


# --- what the pipelines do ---------------------------------------------------------------------------------------

def test_eval_center_resizes_the_shorter_side_then_takes_the_centre():
    recipe = load_recipe("natural", {"image.size": 32, "image.crop_pct": 0.5, "image.mean": [0.2], "image.std": [0.5]})
    config, _, evaluate = pipelines(recipe)
    img = np.random.default_rng(0).random((64, 80, 3), dtype=np.float32)  # shorter side already 32 / 0.5
    expected = (img[16:48, 24:56] - 0.2) / 0.5
    np.testing.assert_allclose(run(evaluate, img).permute(1, 2, 0).numpy(), expected, atol=1e-6)
    big = np.kron(img, np.ones((2, 2, 1), np.float32))  # shorter side 128 -> 64: area-averaging gives img back
    np.testing.assert_allclose(run(evaluate, big).permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_eval_resize_keeps_the_whole_field():
    recipe = load_recipe("microscopy", {"image.size": 32, "image.mean": [0.0], "image.std": [1.0]})
    _, _, evaluate = pipelines(recipe)
    img = np.zeros((64, 128, 3), np.float32)
    img[:, :8] = 1.0  # a bright strip at the left edge: a centre crop would drop it
    out = run(evaluate, img)
    assert tuple(out.shape) == (3, 32, 32)
    assert out[:, :, 0].min() > 0.99 and out[:, :, -1].max() < 0.01


@pytest.mark.parametrize("name", SHIPPED + ["microscopy+4"])
def test_16_bit_steps_stay_distinct_through_eval(name):
    recipe = load_recipe(name.split("+")[0], FOUR_CHANNELS if name.endswith("+4") else None)
    config, _, evaluate = pipelines(recipe)
    _, h, w = config["input_size"]
    img = np.full((h, w, augment.read_channels(recipe)), 30000 / 65535, np.float32)
    img[:, w // 2:] += 1 / 65535  # one 16-bit level brighter; in 8 bits both halves would be 117
    out = run(evaluate, img).double()
    step = out[:, h // 2, -1] - out[:, h // 2, 0]
    expected = torch.tensor(config["std"], dtype=torch.float64).reciprocal() / 65535
    torch.testing.assert_close(step, expected, rtol=0.05, atol=0)


def test_microscopy_has_no_hue_jitter():
    hue_changing = (A.HueSaturationValue, A.PlanckianJitter, A.RGBShift, A.ChannelShuffle, A.ToSepia, A.FancyPCA,
                    A.HEStain, A.ChromaticAberration, A.ToGray)
    for name in ("microscopy", "fluorescence"):
        _, train, _ = pipelines(load_recipe(name))
        found = [t for t in _walk(train) if isinstance(t, hue_changing)
                 or (isinstance(t, A.ColorJitter) and tuple(t.hue) != (0, 0))]
        assert not found, found
    _, natural, _ = pipelines(load_recipe("natural"))  # the detector finds natural's jitter
    assert any(isinstance(t, A.ColorJitter) and tuple(t.hue) != (0, 0) for t in _walk(natural))


def test_microscopy_keeps_replicated_gray_gray():
    recipe = load_recipe("microscopy")
    config, train, _ = pipelines(recipe)
    gray = np.random.default_rng(0).random((256, 256, 1), dtype=np.float32).repeat(3, axis=2)
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    for seed in range(12):
        out = run(train, gray, seed=seed) * std + mean
        assert float((out[1:] - out[:1]).abs().max()) < 1e-5, seed


def test_seeding_the_compose_decides_the_draws():
    _, train, _ = pipelines(load_recipe("microscopy"))
    img = image(load_recipe("microscopy"))
    assert torch.equal(run(train, img, seed=3), run(train, img, seed=3))
    assert not torch.equal(run(train, img, seed=3), run(train, img, seed=4))


# --- serialisation -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_saved_pipelines_reload_to_identical_outputs(tmp_path, name):
    recipe = load_recipe(name)
    _, train, evaluate = pipelines(recipe)
    img = image(recipe)
    for which, pipeline in (("train", train), ("eval", evaluate)):
        path = tmp_path / f"{which}.json"
        augment.save_pipeline(pipeline, path)
        assert json.loads(path.read_text())["__version__"] == A.__version__
        loaded = augment.load_pipeline(path)
        as_dict = augment.pipeline_to_dict(pipeline)
        assert augment.pipeline_to_dict(loaded) == as_dict == json.loads(json.dumps(as_dict))
        assert as_dict["transform"]["transforms"][-2]["__class_fullname__"] == "Normalize"
        loaded_from_dict = augment.pipeline_from_dict(as_dict)
        for seed in range(3):
            expected = run(pipeline, img, seed=seed)
            assert torch.equal(run(loaded, img, seed=seed), expected)
            assert torch.equal(run(loaded_from_dict, img, seed=seed), expected)
    assert torch.equal(run(augment.load_pipeline(tmp_path / "eval.json"), img), run(evaluate, img))


ENTRIES = [(name, where, spec) for name in SHIPPED for where, spec in leaves(load_recipe(name).augment.transforms)]


@pytest.mark.parametrize("name, where, spec", ENTRIES, ids=[f"{n}-{w}-{s['name']}" for n, w, s in ENTRIES])
def test_every_transform_round_trips(tmp_path, name, where, spec):
    """Each transform alone (p=1), saved and reloaded, gives the same output for the same seed, and does something."""
    spec = {**spec, "p": 1.0}
    recipe = load_recipe(name, {"augment.crop": "resize", "augment.transforms": [spec]})
    plain = load_recipe(name, {"augment.crop": "resize", "augment.transforms": []})
    _, train, _ = pipelines(recipe)
    _, untouched, _ = pipelines(plain)
    augment.save_pipeline(train, tmp_path / "t.json")
    loaded = augment.load_pipeline(tmp_path / "t.json")
    assert augment.pipeline_to_dict(loaded) == augment.pipeline_to_dict(train)
    img = image(recipe, 240, 240)
    outs = [run(train, img, seed=s) for s in range(3)]
    assert all(torch.equal(run(loaded, img, seed=s), out) for s, out in enumerate(outs))
    assert any(not torch.equal(out, run(untouched, img)) for out in outs)


# --- early errors ------------------------------------------------------------------------------------------------

def user_recipe(tmp_path, transforms):
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps({"extends": "microscopy", "augment": {"transforms": transforms}}))  # JSON is YAML
    return path, load_recipe(path)


@pytest.mark.parametrize("transforms, fragments", [
    ([{"name": "HorizontalFlp"}], ["'augment.transforms[0].name' = 'HorizontalFlp'", "did you mean 'HorizontalFlip'"]),
    ([{"name": "gaussnoise"}], ["'gaussnoise'", "did you mean 'GaussNoise'"]),
    ([{"name": "OneOf", "transforms": [{"name": "D4"}, {"name": "RandomGama"}]}],
     ["'augment.transforms[0].transforms[1].name' = 'RandomGama'", "did you mean 'RandomGamma'"]),
    ([{"name": "NoSuchThingAtAll"}], ["'NoSuchThingAtAll' is not an albumentations transform"]),
])
def test_unknown_transform_names_the_closest_albumentations_class(tmp_path, transforms, fragments):
    path, recipe = user_recipe(tmp_path, transforms)
    with pytest.raises(RecipeError) as e:
        augment.check_transforms(recipe, str(path))
    for fragment in [str(path), *fragments]:
        assert fragment in str(e.value)


@pytest.mark.parametrize("spec, fragments", [
    ({"name": "GaussNoise", "std_rang": [0.1, 0.2]}, ["(GaussNoise) has no argument 'std_rang'", "'std_range'?"]),
    ({"name": "RandomRotate90", "prob": 0.5}, ["(RandomRotate90) has no argument 'prob'", "Valid: p"]),
    ({"name": "GaussNoise", "std_range": [2, 1]}, ["(GaussNoise)", "std_range"]),
    ({"name": "ColorJitter", "brightness": "x"}, ["(ColorJitter)", "brightness"]),
    ({"name": "OneOf", "transforms": []}, ["(OneOf)", "needs 'transforms'"]),
    ({"name": "OneOf", "transforms": [{"name": "D4"}], "prob": 1}, ["(OneOf) has no argument 'prob'"]),
    ({"name": "HorizontalFlip", "transforms": [{"name": "D4"}]}, ["(HorizontalFlip) has no argument 'transforms'"]),
    ({"name": "MedianBlur", "blur_limit": "x"}, ["(MedianBlur) has bad arguments", "blur_limit"]),
    ({"name": "GaussianBlur", "sigma_limit": [-1, 2]}, ["(GaussianBlur) has bad arguments", "sigma_limit"]),
    ({"name": "Normalize"}, ["Normalize must not be listed", "image.mean"]),
    ({"name": "FromFloat"}, ["FromFloat must not be listed", "16-bit"]),
    ({"name": "RandomCrop", "height": 64, "width": 64}, ["(RandomCrop)", "changes the image shape", "augment.crop"]),
    ({"name": "Mosaic"}, ["(Mosaic)", "fails on a float32 224x224x3 image", "mosaic_metadata"]),
])
def test_bad_transform_arguments_name_the_transform(tmp_path, spec, fragments):
    path, recipe = user_recipe(tmp_path, [{"name": "D4"}, spec])
    with pytest.raises(RecipeError) as e:
        augment.check_transforms(recipe, str(path))
    for fragment in [str(path), "augment.transforms[1]", *fragments]:
        assert fragment in str(e.value)


def test_transforms_with_and_without_a_validation_schema_build():
    specs = [{"name": n, "p": 0.5} for n in ("RandomRotate90", "ToSepia", "HorizontalFlip", "Transpose", "NoOp")]
    recipe = load_recipe("natural", {"augment.transforms": specs + [{"name": "MedianBlur", "blur_limit": 3}]})
    augment.check_transforms(recipe, "natural")
    _, train, _ = pipelines(recipe)
    assert [type(t).__name__ for t in train.transforms][1:-2] == [s["name"] for s in specs] + ["MedianBlur"]


def test_three_channel_only_transform_on_one_channel_is_an_early_error():
    recipe = load_recipe("fluorescence", {"augment.transforms": [{"name": "ISONoise"}]})
    with pytest.raises(RecipeError, match=r"\(ISONoise\) fails on a float32 224x224x1 image: .*3-channel"):
        augment.check_transforms(recipe, "fluorescence")


def test_building_a_bad_pipeline_raises_the_same_recipe_error():
    recipe = load_recipe("natural", {"augment.transforms": [{"name": "GaussNoise", "std_rang": [0.1, 0.2]}]})
    config = augment.data_config(recipe, model())
    with pytest.raises(RecipeError, match=r"recipe 'natural': 'augment.transforms\[0\]' \(GaussNoise\)"):
        augment.build_transforms(recipe, config, train=True)
    augment.build_transforms(recipe, config, train=False)  # evaluation does not use the list


@pytest.mark.parametrize("overrides, fragment", [
    ({"image.interpolation": "bicubik"}, "'image.interpolation' = 'bicubik' is not known; .*did you mean 'bicubic'"),
    ({"augment.crop_ratio": [1.2, 0.8]}, "'augment.crop_ratio'"),
])
def test_crop_settings_are_checked(overrides, fragment):
    with pytest.raises(RecipeError, match=fragment):
        augment.check_transforms(load_recipe("natural", overrides), "natural")


# --- the module itself ---------------------------------------------------------------------------------------------

def test_albumentations_update_check_is_off():
    assert os.environ["NO_ALBUMENTATIONS_UPDATE"] == "1"


def test_augment_is_the_only_importer_of_albumentations():
    package = Path(augment.__file__).parent
    importers = {p.name for p in package.rglob("*.py")
                 if re.search(r"^\s*(import|from)\s+albumentations", p.read_text(), re.M)}
    assert importers == {"augment.py"}


def _walk(t):
    for child in getattr(t, "transforms", []):
        yield child
        yield from _walk(child)
