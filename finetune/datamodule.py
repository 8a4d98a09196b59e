"""Lightning data wiring: datasets from a scanned item table, seeded rank-aware samplers, loader settings."""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from . import multilabel
from .data import ImageDataset, default_workers, drop_failed


class EpochSampler(Sampler):
    """Shuffled (or class-balanced) indices with per-sample augmentation seeds, from (seed, epoch) only, so an epoch
    replays after a resume; each of ``world`` ranks takes every world-th (padded, as DistributedSampler)."""

    def __init__(self, n: int, seed: int, weights: np.ndarray | None = None, rank: int = 0, world: int = 1):
        self.n, self.seed, self.epoch, self.rank, self.world = n, seed, 0, rank, world
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = (torch.randperm(self.n, generator=g) if self.weights is None
                 else torch.multinomial(self.weights, self.n, replacement=True, generator=g))
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        pairs = list(zip(order.tolist(), seeds.tolist()))
        pairs += pairs[:len(self) * self.world - self.n]
        return iter(pairs[self.rank::self.world])


class SeededDataset(Dataset):
    """Accepts ``(index, seed)`` keys from :class:`EpochSampler` and seeds the augmentation for that sample."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        return self.base[index]


class ImageDataModule(pl.LightningDataModule):
    """Train and val loaders over an item table (columns path, label, split)."""

    def __init__(self, items: pd.DataFrame, class_to_idx: dict[str, int], *, read_channels: int,
                 train_transform: Callable, eval_transform: Callable, intensity: Callable | None,
                 batch_size: int = 32, num_workers: int | str = "auto", seed: int = 0,
                 balance: str = "none", max_pixels: int = 89_478_485, skipped: str | os.PathLike | None = None,
                 multi: bool = False):
        super().__init__()
        self.items, self.class_to_idx, self.multi = items.reset_index(drop=True), class_to_idx, multi
        self.read_channels, self.intensity = read_channels, intensity
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size, self.seed, self.balance, self.max_pixels = batch_size, seed, balance, max_pixels
        self.num_workers = default_workers() if num_workers == "auto" else int(num_workers)
        self.skipped = skipped  # CSV where files that fail to read are recorded and left out (data.drop_failed)
        self.features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> a linear probe's cached features

    def _part(self, split: str) -> pd.DataFrame:
        return self.items[self.items["split"] == split].reset_index(drop=True)

    def dataset(self, split: str, train_transform: bool = False) -> Dataset:
        if split in self.features:
            return TensorDataset(*self.features[split])
        return ImageDataset(self._part(split), self.class_to_idx, channels=self.read_channels,
                            transform=self.train_transform if train_transform else self.eval_transform,
                            intensity=self.intensity, max_pixels=self.max_pixels, skipped=self.skipped,
                            multi=self.multi)

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None) -> DataLoader:
        workers = 0 if self.features else self.num_workers
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), collate_fn=drop_failed)

    def _rank(self) -> tuple[int, int]:
        """(rank, world size): the trainer's distributed sampler is off, the loaders shard by rank themselves."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        base, weights = self.dataset("train", train_transform=True), None
        if self.balance == "sampler":  # 1 / its class's count a training image
            labels = self._part("train")["label"]
            weights = (1.0 / labels.map(labels.value_counts())).to_numpy()
        return self._loader(SeededDataset(base, self.train_transform),
                            EpochSampler(len(base), self.seed, weights, *self._rank()))

    def val_dataloader(self) -> DataLoader:
        ds, (rank, world) = self.dataset("val"), self._rank()  # each rank evaluates its share, in order
        return self._loader(ds, DistributedSampler(ds, world, rank, shuffle=False) if world > 1 else None)

    def adapt_dataloader(self) -> DataLoader:
        """Training images through the evaluation pipeline, for re-estimating BN statistics (AdaBN)."""
        return DataLoader(self.dataset("train"), batch_size=self.batch_size, shuffle=True, num_workers=0,
                          generator=torch.Generator().manual_seed(self.seed), collate_fn=drop_failed)

    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency loss weights (mean 1) for ``loss.balance: weights``; multi-label: BCE ``pos_weight``."""
        classes, labels = sorted(self.class_to_idx, key=self.class_to_idx.get), self._part("train")["label"]
        if self.multi:
            return multilabel.pos_weight(multilabel.matrix(labels, classes))
        counts = labels.value_counts().reindex(classes, fill_value=0).to_numpy()
        w = 1.0 / torch.tensor(counts, dtype=torch.float).clamp(min=1)
        return w * len(w) / w.sum()
