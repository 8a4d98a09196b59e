"""Real example image folders built from images that packages ship, so the quickstart needs no network."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def texture_folder(folder: str | Path, patch: int = 64, val_every: int = 4) -> Path:
    """scikit-image's brick, grass and gravel photographs cut into patches, every ``val_every``-th in val/: a 3-class
    folder with train/ and val/ (an existing one is reused, never overwritten)."""
    from skimage import data

    root = Path(folder)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    for name in ("brick", "grass", "gravel"):
        img = getattr(data, name)()
        cols = img.shape[1] // patch
        for i in range(img.shape[0] // patch * cols):
            r, c = divmod(i, cols)
            tile = img[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            out = root / ("val" if i % val_every == 0 else "train") / name
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(tile)).save(out / f"{name}_{i:03d}.png")
    return root


def digits_folder(folder: str | Path, per_class: int | None = None, size: int = 32) -> Path:
    """scikit-learn's 8x8 handwritten digits, upsampled to ``size`` px, one sub-folder per digit."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for label in np.unique(d.target):
        out = Path(folder) / str(label)
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(d.images[d.target == label][:per_class], 1):
            arr = (img / 16.0 * 255).astype(np.uint8)
            Image.fromarray(arr).resize((size, size), Image.BILINEAR).save(out / f"{label}_{i:04d}.png")
    return Path(folder)
