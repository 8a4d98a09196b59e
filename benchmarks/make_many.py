"""A folder of >= 100,000 real image files for the scan and start-up benchmarks: hard links (or copies where the
file system refuses links) of the shared data sets' images, ``--copies`` times over, in one folder per class.

    python benchmarks/make_many.py /tmp/ft-many --copies 12      # 12 x 8,560 = 102,720 files
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from common import DATASETS

SETS = ("bccd_cells", "mitocheck_cells", "hymenoptera")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--copies", type=int, default=12)
    args = ap.parse_args()
    out, n = Path(args.out), 0
    for name in SETS:
        for src in sorted((DATASETS / name).rglob("*")):
            if src.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            folder = out / f"{name}_{src.parent.name}"
            folder.mkdir(parents=True, exist_ok=True)
            stem = "_".join(src.relative_to(DATASETS / name).parts[:-1] + (src.name,))
            for k in range(args.copies):
                dest = folder / f"c{k:02d}_{stem}"
                if not dest.exists():
                    try:
                        os.link(src, dest)
                    except OSError:
                        shutil.copyfile(src, dest)
                n += 1
    print(f"{n} image files in {len({p.parent for p in out.rglob('*') if p.is_file()})} class folders under {out}")


if __name__ == "__main__":
    main()
