"""``finetune pack``: the checked files of a data set, scanned and split as ``finetune train`` would, written in
litdata's streaming format (:mod:`finetune.packed` reads it)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from litdata import optimize

from .data import PACK_INDEX, SPLITS
from .packed import PackedData, _join, _provider, _put
from .recipe import Recipe
from .train import prepare


def pack(data: str | os.PathLike | None, recipe: Recipe, out: str, *, csv: str | os.PathLike | None = None,
         workers: int | None = None, chunk_bytes: str = "64MB") -> "PackedData":
    """Scan and split ``data`` as ``finetune train`` would with ``recipe`` (bad files left out and reported),
    then write every split to ``out`` (a new local folder, or an s3:// gs:// ... URL litdata can write to)."""
    if (_provider(out).exists(_join(out, PACK_INDEX)) if "://" in out
            else Path(out).exists() and any(Path(out).iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: pack never overwrites; choose another --out")
    items, classes, sc = prepare(data, recipe, csv=csv, progress=True)
    if sc.multilabel:
        raise ValueError(f"{sc.source}: packing multi-label data (label sets) is not supported; train from the "
                         f"folder and its CSV")
    items = items.reset_index(drop=True)
    index = {c: i for i, c in enumerate(classes)}
    workers = workers or max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    for split in SPLITS:  # in a seeded random order: litdata shuffles chunks, so a chunk must mix the classes
        rows = items[items["split"] == split].sample(frac=1.0, random_state=recipe.train.seed)
        if len(rows):
            optimize(fn=_sample, inputs=[(p, index[c], i) for i, p, c in zip(rows.index, rows["path"], rows["label"])],
                     output_dir=_join(out, split), chunk_bytes=chunk_bytes, num_workers=min(workers, len(rows)),
                     mode="overwrite", verbose=False)
    t = recipe.train
    meta = {"format": "finetune-pack/1", "source": sc.source, "classes": classes, "recipe": recipe.name,
            "split": {"val_fraction": t.val_fraction, "seed": t.seed, "groups": t.split_groups},
            "counts": {s: int((items["split"] == s).sum()) for s in SPLITS},
            "items": items[["path", "label", "split"]].to_dict(orient="list"),
            "bad": sc.bad.to_dict(orient="list"), "report": sc.report()}
    _put(out, PACK_INDEX, json.dumps(meta))
    return PackedData(out, meta)


def _sample(row: tuple[str, int, int]) -> dict[str, Any]:
    """One stored sample. The path stays in the index (``item`` is its row): litdata would store a string that
    names a file as that file."""
    path, label, item = row
    with open(path, "rb") as f:
        return {"image": f.read(), "label": label, "item": item}
