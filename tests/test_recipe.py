"""The recipe schema: shipped files validate; bad keys, types and ranges fail naming them; extends, overrides, save."""
import dataclasses
import shutil
import typing

import pytest
import yaml

from finetune.recipe import RECIPE_DIR, Recipe, RecipeError, from_dict, list_recipes, load_recipe

SHIPPED = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
SECTIONS = [k for k, tp in typing.get_type_hints(Recipe).items() if dataclasses.is_dataclass(tp)]


def write(tmp_path, text, name="user.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_recipes_are_listed_with_descriptions():
    assert {"natural", "microscopy", "histology"} <= set(SHIPPED)
    listed = list_recipes()
    assert sorted(listed) == SHIPPED
    assert all(listed.values()), listed


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    raw = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())
    if "extends" not in raw:  # a base recipe spells out every section so the user can read each value
        assert set(SECTIONS) <= set(raw), set(SECTIONS) - set(raw)


def test_microscopy_and_natural_differ_where_the_domains_differ():
    nat, mic = load_recipe("natural"), load_recipe("microscopy")
    assert (nat.image.intensity, mic.image.intensity) == ("range", "percentile")
    assert (nat.image.channels, mic.image.channels) == (3, 1)
    assert (nat.freeze.domain, mic.freeze.domain) == ("natural", "microscopy")
    assert mic.augment.crop_scale[0] >= 0.5 and 0.8 <= mic.augment.crop_ratio[0] <= mic.augment.crop_ratio[1] <= 1.25
    assert nat.augment.crop_scale[0] < mic.augment.crop_scale[0]


@pytest.mark.parametrize("text, fragments", [
    ("optim:\n  weight_decya: 0.1\n", ["unknown key 'optim.weight_decya'", "did you mean 'optim.weight_decay'"]),
    ("augmnet:\n  crop: resize\n", ["unknown key 'augmnet'", "did you mean 'augment'"]),
    ("image:\n  chanels: 1\n", ["unknown key 'image.chanels'", "did you mean 'image.channels'"]),
])
def test_misspelt_key_names_key_file_and_closest_key(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    for fragment in [str(path), *fragments]:
        assert fragment in str(e.value)


@pytest.mark.parametrize("text, fragments", [
    ("optim:\n  lr: fast\n", ["'optim.lr'", "must be one of: a number or find", "'fast'"]),
    ("train:\n  epochs: 2.5\n", ["'train.epochs'", "integer"]),
    ("augment:\n  crop_scale: 0.5\n", ["'augment.crop_scale'", "list"]),
    ("train:\n  precision: 16\n", ["'train.precision'", "not allowed", "16-mixed"]),
    ("backbone:\n  pretrained: yes please\n", ["'backbone.pretrained'", "true or false"]),
    ("augment:\n  transforms: HorizontalFlip\n", ["'augment.transforms'", "list"]),
])
def test_wrong_type_names_key_and_value(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    for fragment in [str(path), *fragments]:
        assert fragment in str(e.value)


@pytest.mark.parametrize("text, fragments", [
    ("optim:\n  lr: 50\n", ["'optim.lr' = 50", "out of range"]),
    ("loss:\n  label_smoothing: 1.5\n", ["'loss.label_smoothing'", "out of range"]),
    ("train:\n  batch_size: 0\n", ["'train.batch_size'", "out of range"]),
    ("augment:\n  crop_scale: [0.9, 0.5]\n", ["'augment.crop_scale'", "low <= high"]),
    ("image:\n  channels: 4\n", ["'image.channels' = 4", "image.stem: adapt"]),
    ("freeze:\n  domain: microscopie\n", ["'freeze.domain'", "did you mean 'microscopy'"]),
])
def test_out_of_range_names_key(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    for fragment in [str(path), *fragments]:
        assert fragment in str(e.value)


def test_user_file_extends_a_shipped_recipe_and_changes_one_value(tmp_path):
    path = write(tmp_path, "extends: microscopy\noptim:\n  lr: 3.0e-4\n")
    mine, base = load_recipe(path), load_recipe("microscopy")
    assert mine.optim.lr == 3e-4 != base.optim.lr
    assert dataclasses.replace(mine, optim=dataclasses.replace(mine.optim, lr=base.optim.lr)) == base


def test_extends_chains_and_replaces_lists(tmp_path):
    path = write(tmp_path, "extends: fluorescence\nname: mine\naugment:\n  transforms:\n    - {name: D4, p: 1.0}\n")
    mine, fluo, micro = load_recipe(path), load_recipe("fluorescence"), load_recipe("microscopy")
    assert fluo.augment == micro.augment and fluo.image.stem == "adapt" != micro.image.stem
    assert mine.image == fluo.image and mine.name == "mine"
    assert mine.augment.transforms == [{"name": "D4", "p": 1.0}]


def test_extends_a_sibling_file_by_relative_path(tmp_path):
    write(tmp_path, "extends: natural\ntrain:\n  epochs: 3\n", "base.yaml")
    path = write(tmp_path, "extends: base.yaml\ntrain:\n  batch_size: 8\n")
    recipe = load_recipe(path)
    assert (recipe.train.epochs, recipe.train.batch_size, recipe.image.channels) == (3, 8, 3)


def test_extends_loop_is_an_error(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(tmp_path / "a.yaml")


def test_extends_unknown_recipe_suggests_the_closest(tmp_path):
    with pytest.raises(RecipeError, match="did you mean 'microscopy'"):
        load_recipe(write(tmp_path, "extends: microscopie\n"))


def test_overrides_from_a_command_line_list():
    recipe = load_recipe("natural", ["optim.lr=3e-4", "train.epochs=2", "augment.crop=resize", "image.size=160"])
    assert recipe.optim.lr == 3e-4 and isinstance(recipe.optim.lr, float)  # YAML reads '3e-4' as text
    assert (recipe.train.epochs, recipe.augment.crop, recipe.image.size) == (2, "resize", 160)


def test_overrides_from_python_do_not_touch_the_original():
    base = load_recipe("microscopy")
    recipe = base.override({"optim.lr": 3e-4, "image.mean": [0.4, 0.4, 0.4], "freeze.domain": 0.7})
    assert recipe.optim.lr == 3e-4 and recipe.image.mean == (0.4, 0.4, 0.4) and recipe.freeze.domain == 0.7
    assert base == load_recipe("microscopy")


@pytest.mark.parametrize("overrides, fragment", [
    (["optim.lrr=1e-3"], "did you mean 'optim.lr'"),
    (["optm.lr=1e-3"], "did you mean 'optim'"),
    (["optim.lr=-1"], "out of range"),
    (["optim.lr"], "not key=value"),
    ({"augment.crop": "random"}, "did you mean 'random_resized'"),
])
def test_bad_override_is_an_error(overrides, fragment):
    with pytest.raises(RecipeError, match=fragment):
        load_recipe("natural", overrides)


@pytest.mark.parametrize("name", SHIPPED)
def test_resolved_recipe_saves_and_loads_back_equal(tmp_path, name):
    recipe = load_recipe(name, {"optim.lr": 3e-4, "image.mean": [0.25], "augment.crop_ratio": [0.8, 1.25]})
    path = tmp_path / "run" / "recipe.yaml"
    path.parent.mkdir()
    recipe.save(path)
    assert "extends" not in yaml.safe_load(path.read_text())  # resolved: loads without its parent
    assert load_recipe(path) == recipe
    with pytest.raises(FileExistsError):
        recipe.save(path)


@pytest.mark.parametrize("name", SHIPPED)
def test_users_copy_works_like_the_shipped_file(tmp_path, name):
    path = tmp_path / f"my_{name}.yaml"
    shutil.copy(RECIPE_DIR / f"{name}.yaml", path)
    mine, shipped = load_recipe(path), load_recipe(name)
    assert dataclasses.replace(mine, name=shipped.name) == shipped
    assert mine.override(["optim.lr=3e-4"]) == shipped.override(["optim.lr=3e-4"])


def test_from_dict_names_its_source():
    with pytest.raises(RecipeError, match="my-app: unknown key 'train.epoch'; did you mean 'train.epochs'"):
        from_dict({"train": {"epoch": 3}}, "my-app")
