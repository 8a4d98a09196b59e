"""Preprocessing that travels with a model (reading, intensity scaling, the serialised evaluation pipeline) as one
JSON-able object, so predictions see exactly what training saw."""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .images import read_image, to_unit_float


class Pipeline:
    """An albumentations Compose as a plain ``image -> tensor`` callable (picklable, seedable)."""

    def __init__(self, compose: Any):
        self.compose = compose

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.compose(image=image)["image"]

    def set_random_seed(self, seed: int) -> None:
        self.compose.set_random_seed(seed)


@dataclass
class Preprocess:
    """Everything between a file and a normalised CHW tensor, as data."""

    channels: int  # channels the reader produces
    intensity: str = "range"
    percentiles: tuple[float, float] = (1.0, 99.8)
    stats: tuple[list[float], list[float]] | None = None  # dataset percentiles for intensity 'dataset'
    max_pixels: int = 89_478_485
    pipeline: dict = field(default_factory=dict)  # albumentations to_dict of the evaluation pipeline
    config: dict = field(default_factory=dict)  # the resolved data config (input size, mean, std, ...)

    def intensity_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        return functools.partial(to_unit_float, mode=self.intensity, percentiles=self.percentiles,
                                 stats=self.stats)

    def eval_transform(self) -> Pipeline:
        from .augment import pipeline_from_dict
        return Pipeline(pipeline_from_dict(self.pipeline))

    def read(self, path: str | Path) -> np.ndarray:
        """One file read and intensity-scaled (HWC float in [0, 1]), before resizing: what the pipeline starts from."""
        return self.intensity_fn()(read_image(path, self.channels, max_pixels=self.max_pixels))

    def load(self, path: str | Path, transform: Pipeline | None = None) -> torch.Tensor:
        """One file as the network's input (CHW float tensor)."""
        return (transform or self.eval_transform())(self.read(path))

    def to_dict(self) -> dict:
        stats = None if self.stats is None else [list(s) for s in self.stats]
        return {**asdict(self), "percentiles": list(self.percentiles), "stats": stats}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        stats = None if d.get("stats") is None else tuple(list(s) for s in d["stats"])
        return cls(**{**d, "percentiles": tuple(d["percentiles"]), "stats": stats})
