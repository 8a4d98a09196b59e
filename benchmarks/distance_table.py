"""Distance to ImageNet of the shared datasets and of the images scikit-image and scikit-learn ship.

Prints the markdown table of docs/distance.md (raw and calibrated scores, per stage) and the wall time;
``--stability`` adds how the score moves with the number of images (several seeds), ``--calibrate`` prints the
constant of ``finetune.domain.CALIBRATION`` the measurements imply. CPU only; on 2 busy cores the table took
16 minutes and ``--stability`` 20 more:

    HF_HUB_OFFLINE=1 python benchmarks/distance_table.py --max-images 256 --calibrate --stability
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from finetune import domain  # noqa: E402
from finetune.recipe import load_recipe  # noqa: E402

SHARED = ("hymenoptera", "bccd_cells", "mitocheck_cells")
#: The far anchor of the calibration and the calibrated score it gets (0 stays raw 0: ImageNet's own statistics).
ANCHOR, ANCHOR_SCORE = "bccd_cells", 0.9
#: The shared sets again, read as their domain's recipe reads them (what ``freeze.domain: measure`` sees).
RECIPES = (("bccd_cells", "histology"), ("mitocheck_cells", "microscopy"), ("mitocheck_cells", "fluorescence"))
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def quadrants(a: np.ndarray) -> list[np.ndarray]:
    """Four tiles of one large image: a set of images of one kind from a single file."""
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return [a[:h, :w], a[:h, w:], a[h:, :w], a[h:, w:]]


def package_sets(max_images: int) -> dict[str, list[np.ndarray]]:
    """The images scikit-image and scikit-learn ship, grouped into small sets by kind."""
    import skimage.data as skd
    from sklearn.datasets import load_digits

    return {
        "skimage photos (" + ", ".join(PHOTOS) + ", motorcycle)":
            [getattr(skd, n)() for n in PHOTOS] + [skd.stereo_motorcycle()[0]],
        "skimage lfw_subset (faces, 25x25 gray)": list(skd.lfw_subset()[:max_images]),
        "skimage textures (brick, grass, gravel)": [skd.brick(), skd.grass(), skd.gravel()],
        "skimage ihc (immunohistochemistry), 4 tiles": quadrants(skd.immunohistochemistry()),
        "skimage cell (phase contrast), 4 tiles": quadrants(skd.cell()),
        "sklearn load_digits (8x8)": list((load_digits().images[:max_images] / 16).astype(np.float32)),
    }


def row(name: str, r: domain.DistanceReport, seconds: float) -> str:
    stages = " | ".join(f"{v:.3f}" for v in r.per_stage.values())
    return f"| {name} | {r.n_images} | {r.raw:.4f} | {r.overall:.2f} | {stages} | {seconds:.0f} |"


def stability(model: torch.nn.Module, root: Path, seeds: int, counts: list[int]) -> list[str]:
    """Raw score after the first n images of a seeded sample, for each seed: spread across seeds and drift."""
    lines = ["| dataset | " + " | ".join(f"n={n}" for n in counts) + " |", "|---" * (len(counts) + 1) + "|"]
    for name in SHARED:
        scores: dict[int, list[float]] = {n: [] for n in counts}
        for seed in range(seeds):
            meter = domain.DistanceMeter(model)
            for x in domain.folder_batches(root / name, model, max_images=max(counts), batch_size=16, seed=seed):
                meter.update(x)
                if meter.n_images in scores:
                    scores[meter.n_images].append(meter.report().raw)
        cells = [f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in scores.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", type=Path,
                   default=next((d for d in (here.parent / "shared" / "datasets", here / "shared" / "datasets")
                                 if d.is_dir()), here.parent / "shared" / "datasets"))
    p.add_argument("--max-images", type=int, default=domain.DEFAULT_MAX_IMAGES)
    p.add_argument("--calibrate", action="store_true", help="print the calibration constant the table implies")
    p.add_argument("--stability", action="store_true", help="raw scores after 16..256 images, 3 seeds")
    args = p.parse_args()
    torch.set_num_threads(min(4, os.cpu_count() or 1))

    start = time.perf_counter()
    model = domain.reference_model()
    rows, raws = [], {}
    for name in SHARED:
        t = time.perf_counter()
        r = domain.measure_folder(args.data_root / name, model=model, max_images=args.max_images)
        raws[name] = r.raw
        rows.append((f"{name} (shared)", r, time.perf_counter() - t))
    for name, recipe_name in RECIPES:
        t = time.perf_counter()
        recipe = load_recipe(recipe_name)
        r = domain.measure_folder(args.data_root / name, recipe, model=domain.reference_model(recipe),
                                  max_images=args.max_images)
        rows.append((f"{name}, read by the {recipe_name} recipe", r, time.perf_counter() - t))
    for name, arrays in package_sets(args.max_images).items():
        t = time.perf_counter()
        rows.append((name, domain.distance(model, domain.prepare(arrays, model)), time.perf_counter() - t))
    stage_names = list(rows[0][1].per_stage)
    print(f"{domain.REFERENCE}, weights {getattr(model, 'finetune_source', '?')}, {args.max_images} images at most "
          f"a set, calibration (low, high) = {domain.CALIBRATION[domain.REFERENCE]}\n")
    print("| images | n | raw | calibrated | " + " | ".join(stage_names) + " | s |")
    print("|---" * (len(stage_names) + 5) + "|")
    for name, r, seconds in rows:
        print(row(name, r, seconds))
    print(f"\nwall time {time.perf_counter() - start:.0f} s, {torch.get_num_threads()} threads")

    if args.calibrate:
        high = raws[ANCHOR] / ANCHOR_SCORE
        print(f"\nCALIBRATION = {{'{domain.REFERENCE}': (0.0, {high:.4f})}}  ({ANCHOR} -> {ANCHOR_SCORE})")
    if args.stability:
        t = time.perf_counter()
        print("\nraw score after n images (mean ± sd over 3 seeds)\n")
        print("\n".join(stability(model, args.data_root, 3, [16, 32, 64, 128, 256])))
        print(f"\nstability: {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
