"""Do the class-activation maps of a bccd_cells run sit on the cell? Every crop of bccd_cells is one annotated box,
centred on its cell, so the share of a map's mass inside the central box (half the width and height: a quarter of
the area) should be well above 0.25, the share of a uniform map, for correctly classified white cells (WBC). A
second, sharper measure: the share inside the white cell's stained nucleus, taken as the darkest quarter of the
crop's pixels (a uniform map puts 0.25 there; red cells and plasma are paler than the nucleus).

    python benchmarks/cam_center.py RUN [--split test] [--label WBC] [--methods gradcam gradcam++ eigencam]

Prints one row per method (images, mean and median share, share of images above 0.25) and writes a few overlays
to RUN/cam_center/ to look at.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import DATASETS, set_threads  # noqa: E402


def central_share(cam: np.ndarray, frac: float = 0.5) -> float:
    h, w = cam.shape
    dh, dw = int(round(h * (1 - frac) / 2)), int(round(w * (1 - frac) / 2))
    return float(cam[dh:h - dh, dw:w - dw].sum() / max(cam.sum(), 1e-12))


def nucleus_share(cam: np.ndarray, image: np.ndarray, frac: float = 0.25) -> float:
    """Share of the map's mass on the darkest ``frac`` of the image's pixels (``image``: HxWx3 at the map's size)."""
    lum = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    mask = lum <= np.quantile(lum, frac)
    return float(cam[mask].sum() / max(cam.sum(), 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--split", default="test")
    ap.add_argument("--label", default="WBC")
    ap.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++", "eigencam"])
    ap.add_argument("--show", type=int, default=8)
    args = ap.parse_args()
    set_threads(1)
    from PIL import Image
    from finetune.explain import Explainer
    from finetune.predict import Predictor
    predictor = Predictor.load(args.run, device="cpu")
    files = sorted((DATASETS / "bccd_cells" / args.split / args.label).iterdir())
    k = predictor.classes.index(args.label)
    right = [f for f, p in zip(files, predictor.probabilities(files)[0].argmax(-1).tolist()) if p == k]
    print(f"{len(right)} of {len(files)} {args.label} images of {args.split} classified right")
    out = Path(args.run) / "cam_center"
    out.mkdir(exist_ok=True)
    pre = predictor.preprocess
    x = torch.stack([pre.load(f, pre.eval_transform()) for f in right])
    size = x.shape[-2:]
    pics = [np.asarray(Image.open(f).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)) for f in right]
    print("| method | images | central quarter: mean share | median | images above 0.25 | nucleus (darkest "
          "quarter): mean share | images above 0.25 |\n|---|---|---|---|---|---|---|")
    for method in args.methods:
        ex = Explainer(predictor, method)
        maps = np.concatenate([ex(x[i:i + 32], [k] * len(x[i:i + 32])) for i in range(0, len(x), 32)])
        shares = np.array([central_share(m) for m in maps])
        nuc = np.array([nucleus_share(m, p) for m, p in zip(maps, pics)])
        print(f"| {method} | {len(shares)} | {shares.mean():.2f} | {np.median(shares):.2f} | "
              f"{(shares > 0.25).mean():.0%} | {nuc.mean():.2f} | {(nuc > 0.25).mean():.0%} |")
        views = ex.overlays(right[:args.show], [k] * min(args.show, len(right)))
        strip = np.concatenate([np.concatenate(v, axis=0) for v in views], axis=1)
        Image.fromarray((strip * 255).round().astype(np.uint8)).save(out / f"{method.replace('+', 'p')}.png")
    print(f"overlays (top: the image as the model read it; bottom: the map): {out}/")


if __name__ == "__main__":
    main()
