"""``--recipe auto`` (the default): pick a shipped recipe from what a sample of the images is (bit depth, channels,
whether colour carries information, background brightness and colourfulness) and say why. An explicit recipe wins.
The thresholds and the images they were read from are in docs/recipes.md."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SAMPLE = 64  # images read, spread over the classes
DARK_MEDIAN = 0.1  # a dark background: the median pixel below this share of the image's 0.5-99.5 percentile range
GRAY_DIFF = 0.02  # colour carries no information: mean |R-G| + |G-B| below this (on a 0-1 scale)
STAIN_BRIGHT, STAIN_COLOURFUL = 0.55, 0.15  # stained slides: mean luminance at least, colourfulness below
MAJORITY = 0.6  # share of the sample that must show a property (the others are medians) ...
DARK_MAJORITY = 0.75  # ... but a dark background in 3 of 4: fluorescence 0.92, Fashion-MNIST 0.55-0.6 by sample


@dataclass(frozen=True)
class Look:
    """Shares of a sample of images with each property (``channels``: the most common count, alpha not counted)."""

    n: int
    deep: float  # more than 8 bits a sample (uint16, float)
    channels: int
    gray: float  # one channel, or R, G and B equal
    dark: float  # bright objects on a dark background (fluorescence)
    brightness: float  # median mean luminance (0-1)
    colourfulness: float  # median colourfulness of the colour images (Hasler and Suesstrunk; photos ~0.2)

    @property
    def stained(self) -> bool:
        """A bright background and muted colours, as in stained slides and smears."""
        return self.brightness >= STAIN_BRIGHT and self.colourfulness < STAIN_COLOURFUL


def one_image(arr: np.ndarray, alpha: bool = False) -> dict:
    """The properties of one natively read image (HxWxC)."""
    a = arr[..., :-1] if alpha else arr
    scale = {np.dtype("uint8"): 255.0, np.dtype("uint16"): 65535.0}.get(a.dtype) or max(float(a.max()), 1e-9)
    x = a.astype(np.float32) / scale
    rgb = x[..., :3] if x.shape[-1] >= 3 else None
    gray = rgb is None or float(np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()
                                ) < GRAY_DIFF
    lum = x.mean(-1) if rgb is None else rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    lo, hi = np.percentile(lum, [0.5, 99.5])
    dark = (np.median(lum) - lo) / max(hi - lo, 1e-9) < DARK_MEDIAN
    colourful = np.nan
    if not gray:  # Hasler and Suesstrunk's colourfulness
        rg, yb = rgb[..., 0] - rgb[..., 1], 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
        colourful = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    return {"deep": a.dtype != np.uint8, "channels": a.shape[-1], "gray": gray, "dark": bool(dark),
            "brightness": float(lum.mean()), "colourful": colourful}


def look(paths: list[str], max_pixels: int) -> Look:
    """Read the files natively (no channel conversion) and count their properties; unreadable files are skipped."""
    from .images import ImageError, _read_native
    seen = []
    for p in paths:
        try:
            seen.append(one_image(*_read_native(p, max_pixels, None)))
        except (ImageError, OSError, ValueError):
            continue
    if not seen:
        raise ValueError(f"none of the {len(paths)} sampled images could be read to choose a recipe; pass --recipe")
    df = pd.DataFrame(seen)
    return Look(len(df), float(df["deep"].mean()), int(df["channels"].mode()[0]), float(df["gray"].mean()),
                float(df["dark"].mean()), float(df["brightness"].median()),
                float(df["colourful"].median()) if df["colourful"].notna().any() else 0.0)


def decide(lk: Look) -> tuple[str, dict, list[str]]:
    """(shipped recipe, overrides of it, the reasons in words) for what the images are."""
    pct = lambda share: f"{share:.0%} of {lk.n} sampled images"  # noqa: E731
    colour = {} if lk.gray >= MAJORITY else {"image.channels": 3}  # microscopy: read colour files as colour
    if lk.deep >= MAJORITY or lk.channels > 4:
        what = (f"{lk.channels} channels a file" if lk.channels > 4 else f"more than 8 bits a sample in {pct(lk.deep)}")
        ov = {"image.channels": lk.channels, "image.stem": "adapt"} if lk.channels > 4 else colour
        return "microscopy", ov, [f"recipe 'microscopy': {what}, as cameras on microscopes write them; each image is "
                                  f"rescaled from its own percentiles (a fixed /65535 would leave a 12-bit image "
                                  f"nearly black) and has no up (all 8 rotations and flips)."]
    if lk.dark >= DARK_MAJORITY:
        return "microscopy", colour, [
            f"recipe 'microscopy': bright objects on a dark background in {pct(lk.dark)}, as in fluorescence; "
            f"per-image percentile scaling, rotations and flips, no hue jitter."]
    if lk.gray >= MAJORITY:
        return "natural", {"freeze.domain": "measure"}, [
            f"recipe 'natural': gray images ({pct(lk.gray)}) without a dark background, such as scans, X-rays and "
            f"industrial inspection, read and augmented like photos (the microscopy recipe lost 11 points on such a "
            f"set), with the distance to ImageNet measured rather than declared: gray images are farther from "
            f"ImageNet's photos than natural's 0.07 (Fashion-MNIST measured 0.40, and scored 1-4 points more with it)."]
    seen = f"median brightness {lk.brightness:.2f} and colourfulness {lk.colourfulness:.2f} over {lk.n} sampled images"
    if lk.stained:
        return "histology", {}, [f"recipe 'histology': a bright background and muted colours ({seen}; stained "
                                 f"slides and smears: >= {STAIN_BRIGHT} and < {STAIN_COLOURFUL}), as in stained "
                                 f"tissue and blood; colour kept, stain augmentation, rotations and flips."]
    return "natural", {}, [f"recipe 'natural': colour photographs ({seen}; stained slides: brightness >= "
                           f"{STAIN_BRIGHT} with colourfulness < {STAIN_COLOURFUL}); close to ImageNet's."]


def sample_paths(data, csv=None, n: int = SAMPLE, seed: int = 0) -> list[str]:
    """Up to ``n`` image paths of the data set, spread over its classes (the same files for the same data)."""
    from .data import _csv_rows, _folder_rows, _locate
    root, csv_path = _locate(data, csv)
    rows = _csv_rows(csv_path, root, [])[0] if csv_path is not None else _folder_rows(root, [])[0]
    rows = rows[rows["path"] != ""].sample(frac=1.0, random_state=seed)
    labels = rows["label"].astype(str)  # multi-label cells are label sets
    per = max(1, -(-n // max(labels.nunique(), 1)))
    return rows.groupby(labels, sort=False).head(per).head(n)["path"].tolist()


def choose(data, csv=None, max_pixels: int = 89_478_485) -> tuple[str, dict, list[str]]:
    """The recipe for this data: (shipped name, overrides, reasons)."""
    return decide(look(sample_paths(data, csv), max_pixels))


def resolve(recipe, data=None, csv=None, overrides=None):
    """(Recipe, why it was chosen): ``recipe`` as given (a Recipe, a shipped name or a YAML path), or for None or
    'auto' the one :func:`choose` picks (packed data: the one it was packed with); ``overrides`` apply last."""
    from .data import is_packed
    from .recipe import Recipe, load_recipe
    if isinstance(recipe, Recipe):
        chosen, why = recipe, []
    elif recipe not in (None, "auto") or data is None and csv is None:
        chosen, why = load_recipe(None if recipe == "auto" else recipe), []  # None: natural
    elif is_packed(data):
        from .packed import PackedData
        name = PackedData(str(data)).meta.get("recipe", "natural")
        chosen, why = load_recipe(name), [f"recipe '{name}': the one {data} was packed with."]
    else:
        name, ov, why = choose(data, csv)
        chosen = load_recipe(name, ov)
    return (chosen.override(overrides) if overrides else chosen), why
