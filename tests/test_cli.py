"""The ``finetune`` command on bad input: exit codes, one clear line on stderr that names the problem and the fix,
``check`` without training, ``--strict``, and run folders that are never overwritten."""
import argparse
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from finetune import backbone
from finetune.cli import build_parser, main

TINY = ["--epochs", "1", "--image-size", "16", "--batch-size", "8", "--no-progress", "--set", "train.num_workers=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def data(tmp_path) -> Path:
    """Two classes of four random 20 px PNGs."""
    for c, name in enumerate(("cat", "dog")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            _png(tmp_path / "data" / name / f"{i}.png", 10 * c + i)
    return tmp_path / "data"


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, command: str = "train") -> str:
    """The error line; fails unless stderr is exactly one line starting with 'finetune COMMAND: error:'."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finetune {command}: error: "), err
    return lines[0]


# -- bad data ----------------------------------------------------------------------------------------------------

def test_check_prints_the_report_and_exits_1_when_files_are_bad(capsys, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "check", data)
    assert code == 0 and "8 images in 2 classes; 0 bad files skipped" in out
    (data / "dog" / "empty.png").write_bytes(b"")
    (data / "cat" / "notes.jpg").write_text("not a photo")
    code, out, _ = cli(capsys, "check", data)
    assert code == 1
    assert "2 bad files skipped" in out and "dog/empty.png: empty file" in out and "cat/notes.jpg: not an image" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no run folder: nothing trained


def test_check_reports_even_when_most_files_are_bad(capsys, data):
    for i in range(10):
        (data / "cat" / f"bad{i}.png").write_bytes(b"")
    code, out, _ = cli(capsys, "check", data)
    assert code == 1 and "10 bad files skipped" in out


def test_strict_stops_at_the_first_bad_file(capsys, data, tmp_path):
    (data / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    code, _, err = cli(capsys, "train", data, "--strict", "--out", tmp_path / "runs", *TINY)
    assert code == 2
    assert "dog/broken.png: corrupt" in err and "strict mode stops at the first bad file" in err
    assert "leave out --strict to skip bad files" in err and "strict=False" not in err and "strict:" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_too_many_bad_files_stop_training_with_the_knob_to_turn(capsys, data, tmp_path):
    for i in range(3):
        (data / "cat" / f"bad{i}.png").write_bytes(b"")
    code, _, err = cli(capsys, "train", data, "--out", tmp_path / "runs", *TINY)
    assert code == 2 and "3 of 11 files" in err and "train.max_bad_fraction" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_four_channel_files_with_an_rgb_recipe_name_both_sides(capsys, data, tmp_path):
    for c in ("cat", "dog"):
        for i in range(4):
            tifffile.imwrite(data / c / f"{i}.tif", np.zeros((20, 20, 4), np.uint8), photometric="minisblack",
                             planarconfig="contig")
            (data / c / f"{i}.png").unlink()
    code, _, err = cli(capsys, "train", data, "--out", tmp_path / "runs", *TINY)
    assert code == 2 and "file has 4 channels, the recipe reads 3: set image.channels: 4" in err
    # taking that advice alone meets the next contradiction, which names both settings and the fix
    code, _, err = cli(capsys, "train", data, "--set", "image.channels=4", "--out", tmp_path / "runs", *TINY)
    line = one_line_error(err)
    assert code == 2 and "'image.channels' = 4" in line and "'image.stem' = replicate" in line
    assert "set image.stem: adapt" in line


# -- bad configuration -------------------------------------------------------------------------------------------

def test_unknown_backbone_suggests_the_closest_timm_names(capsys, data, tmp_path):
    code, _, err = cli(capsys, "train", data, "--backbone", "tf_efficientnet_lit0", "--out", tmp_path / "runs", *TINY)
    line = one_line_error(err)
    assert code == 2 and "unknown backbone 'tf_efficientnet_lit0'; did you mean: tf_efficientnet_lite0" in line
    code, _, err = cli(capsys, "inspect", "resnet5")
    assert code == 2 and "did you mean: resnet50" in one_line_error(err, "inspect")


@pytest.mark.parametrize("args, says", [
    (["--set", "freeze.mode=fixed"], ["'freeze.mode' = fixed", "needs 'freeze.depth'"]),
    (["--weights", "w.pth", "--set", "backbone.pretrained=false"],
     ["--weights 'w.pth' contradicts backbone.pretrained: false", "drop one of them"]),
    (["--set", "image.channels=1", "--set", "image.mean=[0.5,0.5]"],
     ["'image.mean' has 2 values", "image.channels=1", "give 3 values or null"]),
    (["--set", "optim.lrr=0.1"], ["unknown key 'optim.lrr'", "did you mean 'optim.lr'"]),
    (["--epochs", "0"], ["'train.epochs' (--epochs) = 0 is out of range", "use a value in [1, 100000]"]),
    (["--set", "augment.crop=zoom"], ["'augment.crop' = 'zoom' is not allowed", "choose one of random_resized"]),
    (["--recipe", "naturall"], ["recipe 'naturall'", "did you mean 'natural'"]),
])
def test_bad_settings_give_one_line_naming_them_and_the_fix(capsys, data, tmp_path, args, says):
    code, _, err = cli(capsys, "train", data, "--out", tmp_path / "runs", *TINY, *args)
    line = one_line_error(err)
    assert code == 2 and all(s in line for s in says), line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_missing_data_and_non_runs_are_one_line_errors(capsys, data, tmp_path):
    code, _, err = cli(capsys, "train", "--out", tmp_path / "runs")
    assert code == 2 and "give an image folder (or --csv FILE), or --resume RUN" in one_line_error(err)
    code, _, err = cli(capsys, "train", tmp_path / "nope", "--out", tmp_path / "runs")
    assert code == 2 and "nope is not a folder" in one_line_error(err)
    code, _, err = cli(capsys, "train", "--resume", data)
    assert code == 2 and "is not a finetune run folder (no recipe.yaml)" in one_line_error(err)


# -- untrusted recipes ---------------------------------------------------------------------------------------------

def test_recipe_file_with_a_python_tag_is_refused_and_runs_nothing(capsys, data, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(f"name: x\ndescription: !!python/object/apply:os.system ['touch {marker}']\n")
    code, _, err = cli(capsys, "train", data, "--recipe", tmp_path / "evil.yaml", "--out", tmp_path / "runs", *TINY)
    assert code == 2 and "evil.yaml: not valid YAML" in err and "python/object/apply:os.system" in err
    assert not marker.exists()


def test_override_with_a_python_tag_runs_nothing(capsys, data, tmp_path):
    marker = tmp_path / "pwned"
    code, _, err = cli(capsys, "train", data, "--set", f"optim.lr=!!python/object/apply:os.system ['touch {marker}']",
                       "--out", tmp_path / "runs", *TINY)
    assert code == 2 and "python/object/apply:os.system" in err
    assert not marker.exists()


def test_override_that_is_not_yaml_is_a_one_line_recipe_error(capsys, data, tmp_path):
    code, _, err = cli(capsys, "train", data, "--set", "optim.lr=[1", "--out", tmp_path / "runs", *TINY)
    assert code == 2 and "optim.lr" in one_line_error(err)


# -- run folders -------------------------------------------------------------------------------------------------

def test_train_with_a_relative_out_then_the_same_name_again_is_refused(capsys, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "train", data, "--out", "runs", "--name", "r", *TINY)
    assert code == 0, err
    assert "run folder: runs/r" in out and "best checkpoint: checkpoints/best-epoch=00.ckpt" in out
    before = {p: p.read_bytes() for p in Path("runs/r").rglob("*") if p.is_file()}
    code, _, err = cli(capsys, "train", data, "--out", "runs", "--name", "r", *TINY)
    line = one_line_error(err)
    assert code == 2 and "runs/r exists and is never overwritten" in line and "--resume runs/r" in line
    assert {p: p.read_bytes() for p in Path("runs/r").rglob("*") if p.is_file()} == before


def test_plan_takes_the_train_options_and_previews_that_run(capsys, data, tmp_path):
    """``finetune plan`` with train's options shows the plan of that exact run: here 2 epochs (no room for LP-FT)
    and batches of 8 (too small to re-estimate BN statistics)."""
    code, out, err = cli(capsys, "plan", data, "--epochs", "2", "--batch-size", "8", "--image-size", "16",
                         "--set", "freeze.mode=fixed", "--set", "freeze.depth=6", "--set", "freeze.schedule=lp-ft")
    assert code == 0, err
    assert "2 epochs, batches of 8" in out and "lp-ft needs at least 3 epochs" in out
    table = out.split("\n\n")[-1].splitlines()
    head = next(line for line in table if line.startswith("head"))
    assert head.rstrip().endswith(" -") and "stats fixed, scale/shift train" in out
    code, out, _ = cli(capsys, "plan", data, "--epochs", "5", "--set", "freeze.mode=fixed", "--set",
                       "freeze.depth=6", "--set", "freeze.schedule=lp-ft")
    assert code == 0 and "linear probe for 1 epoch(s)" in out and "from epoch 1" in out


# -- the command line's own words ----------------------------------------------------------------------------------

def _csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return path


def test_check_takes_a_csv_without_a_folder_and_absolute_paths_in_it(capsys, data, tmp_path):
    listed = [(data / c / f"{i}.png", c) for c in ("cat", "dog") for i in range(4)]  # written in full
    code, out, err = cli(capsys, "check", "--csv", _csv(tmp_path / "lists" / "items.csv", listed))
    assert code == 0, err
    assert "8 images in 2 classes; 0 bad files skipped" in out
    code, _, err = cli(capsys, "check")
    assert code == 2 and "give an image folder, or --csv FILE" in one_line_error(err, "check")


def test_check_refuses_a_folder_with_one_class(capsys, data):
    for f in (data / "dog").iterdir():
        f.unlink()
    (data / "dog").rmdir()
    code, out, err = cli(capsys, "check", data)
    assert "4 images in 1 classes" in out  # the report still shows what was found
    line = one_line_error(err, "check")
    assert code == 2 and "1 class (cat)" in line and "a classifier needs at least two" in line


def test_messages_name_the_flags_the_user_typed(capsys, data, tmp_path, monkeypatch):
    _png(tmp_path / "stray.png", 99)
    rows = [(f"{c}/{i}.png", c) for c in ("cat", "dog") for i in range(4)] + [("../stray.png", "cat")]
    code, out, _ = cli(capsys, "check", data, "--csv", _csv(data / "items.csv", rows))
    assert code == 1 and "outside data root" in out
    assert "pass --allow-outside if intended" in out and "allow_outside" not in out
    code, out, _ = cli(capsys, "check", data, "--csv", data / "items.csv", "--allow-outside")
    assert code == 0 and "9 images in 2 classes" in out

    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "check", tmp_path / "empty")
    assert code == 2 and "or --csv FILE with path,label" in err and "csv=" not in err

    monkeypatch.setattr(backbone, "_hub_cache", lambda cfg: None)  # as on a machine that never downloaded it
    code, _, err = cli(capsys, "train", data, "--backbone", "resnet18", "--out", tmp_path / "runs", *TINY)
    assert code == 2 and "no pretrained weights for backbone 'resnet18'" in err
    assert "pass a local file: --weights path/to/resnet18.pth" in err
    assert "--set backbone.pretrained=false" in err
    assert "create_backbone(" not in err and "pretrained=False" not in err


def test_every_option_and_argument_has_help():
    def walk(parser: argparse.ArgumentParser, name: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")
            elif not isinstance(action, argparse._HelpAction):
                yield name, "/".join(action.option_strings) or action.dest, action.help

    missing = [f"{cmd} {opt}" for cmd, opt, text in walk(build_parser(), "finetune") if not text]
    assert not missing, f"without help text: {missing}"


def test_printed_output_ends_with_exactly_one_newline(capsys, data):
    for args in (["recipes"], ["recipes", "microscopy"], ["check", data],
                 ["distance", data, "--max-images", "8", "--set", "image.size=32"]):
        code, out, err = cli(capsys, *args)
        assert code == 0, err
        assert out.endswith("\n") and not out.endswith("\n\n"), (args, out[-80:])


def test_unknown_backbone_suggests_names_with_offline_weights_first(capsys):
    code, _, err = cli(capsys, "inspect", "tf_efficientnet_lite")
    line = one_line_error(err, "inspect")
    names = line.split("did you mean: ")[1].rstrip("?").split(", ")
    assert names[0] == "tf_efficientnet_lite0 (offline weights)"  # difflib alone puts lite4 first
    assert set(names[1:3]) == {"tf_efficientnet_lite1", "tf_efficientnet_lite2"}  # packaged, pip-installable


def test_train_says_in_one_line_how_many_files_it_skipped_and_where_they_are_listed(capsys, data, tmp_path):
    (data / "cat" / "empty.png").write_bytes(b"")
    code, out, err = cli(capsys, "train", data, "--out", tmp_path / "runs", "--name", "r", *TINY)
    assert code == 0, err
    listed = tmp_path / "runs" / "r" / "bad_files.csv"
    assert f"1 unreadable file skipped (empty file 1): listed in {listed}" in err.splitlines()
