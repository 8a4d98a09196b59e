"""Run folders (``runs/<name>/``: recipe.yaml, classes.json, items.csv, plan.json, data.json, checkpoints/, logs/,
summary.json, ...): created once, appended to on resume, read back by evaluate, predict and export."""
from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from .fileio import atomic_write
from .freeze import Plan
from .recipe import Recipe, from_dict, load_recipe


class RunError(RuntimeError):
    """A run folder is missing, incomplete or would be overwritten."""


def next_free(parent: str | Path, base: str) -> Path:
    """Create and return ``parent/base``, or ``base-2``, ``base-3``...: the first that does not exist (``mkdir`` is
    atomic, so two processes never get the same folder)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = Path(parent) / (base if i == 1 else f"{base}-{i}")
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            return path
    raise RunError(f"no free folder name for {parent / base}")


def new_folder(parent: str | Path, base: str, out: str | Path | None = None) -> Path:
    """``out`` created (one that exists is an error), or by default the first free ``parent/base[-N]``."""
    if out is None:
        return next_free(parent, base)
    try:
        (out := Path(out)).mkdir(parents=True)
    except FileExistsError:
        raise FileExistsError(f"{out} exists and is never overwritten; choose another --out") from None
    return out


def read_logs(run_path: str | Path) -> pd.DataFrame:
    """Every row of a run's Lightning CSV logs, attempts in numeric version order (version_2 before version_10);
    the learning-rate rows, logged at an epoch's start without an epoch number, get the epoch they start."""
    files = sorted(Path(run_path).glob("logs/version_*/metrics.csv"),
                   key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    if not files:
        return pd.DataFrame()
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    if "epoch" in df:
        df["epoch"] = df["epoch"].bfill()
    return df


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that saves through :func:`atomic_write` and loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: Any = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint(path, map_location)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint as data only (``weights_only=True``): a crafted pickle cannot run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError and RuntimeError alike
        raise RunError(f"{path} is not a plain checkpoint and was refused (only tensors and plain data load; "
                       f"nothing in it was executed): {str(e).splitlines()[0]}") from None


class Run:
    """One run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, out: str | Path, name: str | None, stem: str) -> Run:
        """A new run folder: ``out/name`` (one that exists is an error) or ``out/<stem>-<time>``, numbered if taken."""
        if not name:
            return cls(next_free(out, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"))
        try:
            (path := Path(out) / name).mkdir(parents=True)
        except FileExistsError:
            raise RunError(f"run folder {path} exists and is never overwritten; choose another --name, or "
                           f"continue it with: finetune train --resume {path}") from None
        return cls(path)

    def write_new(self, name: str, data: str | bytes) -> Path:
        """Write a file that must not exist yet (a run's records are written once)."""
        path = self.path / name
        if path.exists():
            raise RunError(f"{path} exists and is never overwritten")
        atomic_write(path, data)
        return path

    def write_json(self, name: str, obj: Any, replace: bool = False) -> Path:
        text = json.dumps(obj, indent=2, default=_jsonable)
        if not replace:
            return self.write_new(name, text)
        atomic_write(self.path / name, text)
        return self.path / name

    @classmethod
    def open(cls, path: str | Path) -> Run:
        run = cls(path)
        if not (run.path / "recipe.yaml").is_file():
            raise RunError(f"{run.path} is not a finetune run folder (no recipe.yaml); pass the folder that "
                           f"'finetune train' created, e.g. runs/<name>")
        return run

    def read_json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except FileNotFoundError:
            raise RunError(f"{self.path / name} is missing: the run folder is incomplete") from None

    @property
    def recipe(self) -> Recipe:
        return load_recipe(self.path / "recipe.yaml")

    @property
    def classes(self) -> list[str]:
        return self.read_json("classes.json")

    @property
    def plan(self) -> Plan:
        return Plan.from_state_dict(self.read_json("plan.json"))

    @property
    def items(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "items.csv", keep_default_na=False)

    @property
    def summary(self) -> dict:
        return self.read_json("summary.json") if (self.path / "summary.json").exists() else {}

    def checkpoint(self, which: str = "final") -> Path:
        """The final model (the refit's last epoch after a refit, else the best epoch), the best or the last
        checkpoint of the first fit."""
        folder, s, tries = self.path / "checkpoints", self.summary, []
        if which != "last":  # the refit's final model, the recorded best, the newest best-*.ckpt
            named = [s.get("refit", {}).get("checkpoint") if which == "final" else None, s.get("best_checkpoint")]
            tries = [self.path / p for p in named if p] + sorted(folder.glob("best-*.ckpt"))[-1:]
        path = next((p for p in tries if p.is_file()), folder / "last.ckpt")
        if not path.is_file():
            raise RunError(f"{self.path} has no {which} checkpoint yet (the run stopped before its first epoch "
                           f"ended); start it again")
        return path

    def training_items(self, checkpoint: str | Path) -> pd.DataFrame:
        """The items ``checkpoint`` (a file of this run) trained on: train + val for the refit's."""
        refit = Path(checkpoint).resolve().is_relative_to((self.path / "refit").resolve())
        return self.items[self.items["split"].isin(["train", "val"] if refit else ["train"])]

    def metrics(self) -> pd.DataFrame:
        """One row an epoch, merged over every (resumed) attempt's CSV log."""
        df = read_logs(self.path)
        return df.groupby("epoch", as_index=False).last() if "epoch" in df else df


def recipe_from_checkpoint(ckpt: dict) -> Recipe:
    return from_dict(ckpt["finetune"]["recipe"], "checkpoint")


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to JSON")
