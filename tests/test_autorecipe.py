"""``--recipe auto``: the shipped recipe chosen from what the images are, explained, and never over a user's choice."""
import numpy as np
import pytest
import tifffile
from PIL import Image

from finetune.autorecipe import Look, choose, decide, one_image, resolve


def _folder(root, make, n=6):
    """Two classes of ``n`` images each, written by ``make(path_stem, rng)``."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            make(root / c / str(i), rng)
    return root


def _blobs(rng, dtype=np.uint8, top=255):
    """Bright round objects on a dark, slightly noisy background: fluorescence."""
    a = rng.normal(0.03 * top, 0.01 * top, (48, 48))
    yy, xx = np.mgrid[:48, :48]
    for _ in range(3):
        y, x = rng.integers(8, 40, 2)
        a[(yy - y) ** 2 + (xx - x) ** 2 < 25] = 0.8 * top
    return np.clip(a, 0, top).astype(dtype)


def _stained(rng):
    """A bright pinkish background with muted purple cells: a stained smear."""
    a = np.empty((48, 48, 3), np.float32)
    a[:] = (235, 210, 220)
    a[10:20, 10:20] = (170, 120, 190)
    return np.clip(a + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8)


def test_16_bit_gray_tiffs_get_the_microscopy_recipe(tmp_path):
    root = _folder(tmp_path / "d", lambda p, r: tifffile.imwrite(f"{p}.tif", _blobs(r, np.uint16, 4095) + 200))
    name, overrides, why = choose(root)
    assert (name, overrides) == ("microscopy", {}) and "more than 8 bits" in why[0]


def test_8_bit_fluorescence_gets_microscopy_and_gray_textures_natural(tmp_path):
    dark = _folder(tmp_path / "dark", lambda p, r: Image.fromarray(_blobs(r)).save(f"{p}.png"))
    assert choose(dark)[0] == "microscopy"
    mid = _folder(tmp_path / "mid", lambda p, r: Image.fromarray(r.integers(60, 200, (48, 48), dtype=np.uint8)).save(
        f"{p}.png"))
    name, overrides, why = choose(mid)
    assert name == "natural" and overrides == {"freeze.domain": "measure"} and "gray images" in why[0]


def test_gray_saved_as_rgb_counts_as_gray(tmp_path):
    rgb = _folder(tmp_path / "rgb", lambda p, r: Image.fromarray(np.repeat(_blobs(r)[..., None], 3, -1)).save(
        f"{p}.png"))
    assert choose(rgb)[:2] == ("microscopy", {})  # a colour file whose channels are equal reads as one channel


def test_stained_colour_gets_histology_and_photos_natural(tmp_path):
    assert choose(_folder(tmp_path / "smear", lambda p, r: Image.fromarray(_stained(r)).save(f"{p}.png")))[0] \
        == "histology"
    from skimage import data
    photo = data.astronaut()
    photos = _folder(tmp_path / "photos", lambda p, r: Image.fromarray(
        photo[r.integers(0, 400):][:112, 100:212]).save(f"{p}.png"))
    name, _, why = choose(photos)
    assert name == "natural" and "colourfulness" in why[0]


def test_many_channels_adapt_the_stem():
    name, overrides, why = decide(Look(n=8, deep=1.0, channels=5, gray=0.0, dark=1.0, brightness=0.1,
                                       colourfulness=0.0))
    assert name == "microscopy" and overrides == {"image.channels": 5, "image.stem": "adapt"}
    assert "5 channels" in why[0]


def test_one_image_properties():
    rng = np.random.default_rng(0)
    fl = one_image(_blobs(rng)[..., None])
    assert fl["gray"] and fl["dark"] and not fl["deep"]
    st = one_image(_stained(rng))
    assert not st["gray"] and st["brightness"] > 0.55 and st["colourful"] < 0.15


def test_explicit_recipe_wins_and_overrides_apply_last(tmp_path):
    root = _folder(tmp_path / "d", lambda p, r: tifffile.imwrite(f"{p}.tif", _blobs(r, np.uint16, 4095)))
    recipe, why = resolve("natural", root)
    assert recipe.name == "natural" and why == []
    recipe, why = resolve(None, root, overrides=["train.epochs=2", "image.intensity=range"])
    assert recipe.name == "microscopy" and recipe.train.epochs == 2 and recipe.image.intensity == "range"
    assert why and "microscopy" in why[0]


def test_unreadable_sample_is_a_clear_error(tmp_path):
    root = _folder(tmp_path / "d", lambda p, r: (p.parent / f"{p.name}.png").write_bytes(b"not an image"))
    with pytest.raises(ValueError, match="pass --recipe"):
        choose(root)


def test_plan_without_recipe_says_which_and_why(tmp_path, capsys):
    """The issue's case: 16-bit gray TIFFs with no --recipe are read by the microscopy recipe, and the plan says so."""
    from finetune.cli import main
    root = _folder(tmp_path / "d", lambda p, r: tifffile.imwrite(f"{p}.tif", _blobs(r, np.uint16, 4095)), n=10)
    assert main(["plan", str(root), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "recipe 'microscopy'" in out and "- recipe 'microscopy': more than 8 bits" in out
    assert "declared 'microscopy'" in out  # the chosen recipe's domain drives the plan
