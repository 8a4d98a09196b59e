"""Packed data (written by :mod:`finetune.pack`): the checked files' bytes in litdata's streaming format under
``DEST/{train,val,test}/``, indexed by ``DEST/finetune_pack.json``; and the data module that trains from it."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pandas as pd
from torch.utils.data import DataLoader

try:
    from litdata import StreamingDataLoader, StreamingDataset
except ImportError as e:  # the [scale] extra
    raise ImportError("packed data needs litdata: pip install 'finetune[scale]' (or pip install litdata)") from e

from .data import PACK_INDEX, DataError, ImageDataset, drop_failed, save_report
from .datamodule import ImageDataModule
from .recipe import Recipe

log = logging.getLogger("finetune")


class PackedData:
    """A packed dataset as ``train.prepare`` returns it for a folder's scan: items, classes, the report."""

    multilabel = False  # pack refuses label sets

    def __init__(self, url: str, meta: dict | None = None):
        self.url = str(url)
        self.meta = meta or json.loads(_get(self.url, PACK_INDEX))
        self.classes: list[str] = self.meta["classes"]
        self.items = pd.DataFrame(self.meta["items"])
        self.bad = pd.DataFrame(self.meta["bad"])

    def check(self, recipe: Recipe) -> None:
        """Refuse what needs the image files; warn when the recipe asks for another split than the packed one."""
        for wanted, key, other in ((recipe.freeze.domain == "measure", "freeze.domain: measure",
                                    "name the domain or give the distance `finetune distance` measures on the folder"),
                                   (recipe.image.intensity == "dataset", "image.intensity: dataset",
                                    "use percentile or range")):
            if wanted:
                raise DataError(f"{key} reads the image files, not packed data ({self.url}): {other}")
        t, packed = recipe.train, self.meta["split"]
        if (t.val_fraction, t.seed, t.split_groups) != (packed["val_fraction"], packed["seed"], packed["groups"]):
            log.warning("%s was split with val_fraction %s, seed %s, groups %s; that split is used (the recipe's "
                        "train.val_fraction/seed/split_groups apply when packing)", self.url, packed["val_fraction"],
                        packed["seed"], packed["groups"])

    def save_report(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        """``bad_files.csv`` and ``data_report.txt`` of the scan the pack was made from, into a new run folder."""
        return save_report(folder, self.bad, f"Packed data: {self.url}\n\n{self.meta['report']}")


class PackedDataModule(ImageDataModule):
    """ImageDataModule whose loaders stream the packed splits (litdata's StreamingDataLoader: shuffled per
    epoch, split over ranks and workers, its position saved in the checkpoint); class weights come from the items."""

    def __init__(self, url: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.balance == "sampler":
            raise DataError("loss.balance: sampler needs random access to every image; packed data is streamed: "
                            "use loss.balance: weights")
        self.url = url

    def dataset(self, split: str, train_transform: bool = False, shuffle: bool = False):
        """The split streamed, or an empty ImageDataset for a split that was not packed."""
        part = self._part(split)
        decode = ImageDataset(part.iloc[:0], self.class_to_idx, channels=self.read_channels,
                              transform=self.train_transform if train_transform else self.eval_transform,
                              intensity=self.intensity, max_pixels=self.max_pixels, skipped=self.skipped)
        if part.empty:
            return decode
        return PackedDataset(_join(self.url, split), decode, self.items["path"].to_numpy(dtype=str), shuffle=shuffle,
                             seed=self.seed)

    def _loader(self, dataset, sampler=None) -> DataLoader:
        if not isinstance(dataset, PackedDataset):
            return super()._loader(dataset)
        return StreamingDataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                   collate_fn=drop_failed)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train", train_transform=True, shuffle=True))

    def adapt_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train", shuffle=True))


class PackedDataset(StreamingDataset):
    """A streamed split, each sample decoded from its bytes by ``decode`` (an ImageDataset); ``paths`` name failures."""

    def __init__(self, url: str, decode: ImageDataset, paths, **kwargs):
        super().__init__(url, **kwargs)
        self.decode, self.paths = decode, paths

    def __getitem__(self, index):
        s = super().__getitem__(index)
        return self.decode.sample(str(self.paths[s["item"]]), int(s["label"]), data=bytes(s["image"]))


# -- local folders and object storage ----------------------------------------------------------------------------

def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name if "://" in url else str(Path(url) / name)


def _provider(url: str):
    from litdata.streaming.fs_provider import _get_fs_provider
    return _get_fs_provider(url)


def _put(url: str, name: str, text: str) -> None:
    if "://" not in url:
        with open(Path(url) / name, "x") as f:
            f.write(text)
        return
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_text(text)
        _provider(url).upload_file(str(Path(tmp) / name), _join(url, name))


def _get(url: str, name: str) -> str:
    if "://" not in url:
        return (Path(url) / name).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        _provider(url).download_file(_join(url, name), str(Path(tmp) / name))
        return (Path(tmp) / name).read_text()
