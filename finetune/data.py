"""Find a dataset's images (class folders or a CSV), decode each one to check it, report what was skipped,
split it, and serve it as a torch Dataset."""
from __future__ import annotations

import functools
import multiprocessing
import os
import re
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import multilabel, scancache
from .images import (IMAGE_EXTENSIONS, MAX_PIXELS, ImageError, ImageInfo, _check_channels, examine, read_image,
                     to_unit_float)
from .multilabel import stratified_val

if TYPE_CHECKING:  # torch is imported where a dataset is read: a (cached) scan need not wait seconds for it
    import torch

__all__ = ["DataError", "ImageDataset", "PACK_INDEX", "SCAN_MODES", "SPLITS", "Scan", "bad_files_note", "counts_table",
           "default_workers", "drop_failed", "is_packed", "record_skipped", "scan", "split"]

SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "": ""}
PACK_INDEX = "finetune_pack.json"  # the index file of a dataset written by `finetune pack` (packed.py)
SCAN_MODES = {"auto": None, "full": True, "header": False}  # train.scan -> scan(decode=...)
HEADER_ONLY_FROM = 100_000  # files: with decode=None (train.scan: auto) larger sets are checked by their headers only
_PROCESSES_FROM = 2_000  # files: below, a thread pool (no process start-up), and no progress bar
# OS and tool litter, skipped silently like hidden files (names compared lower-case)
_LITTER = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx", "@eadir", "$recycle.bin",
                     "system volume information", "icon\r"})


class DataError(Exception):
    """The dataset as a whole cannot be used; the message says why and what to change."""


@dataclass
class Scan:
    """What scan() found: usable ``items`` (path, label, split, and any extra CSV columns), skipped ``bad`` files
    (path, reason), the sorted class list and map, warnings, and per-image size/dtype in ``image_info``."""

    root: Path
    source: str
    items: pd.DataFrame
    bad: pd.DataFrame
    classes: list[str]
    class_to_idx: dict[str, int]
    warnings: list[str]
    image_info: pd.DataFrame
    multilabel: bool = False  # label cells hold ';'-separated label sets

    def report(self) -> str:
        """Counts per class and split, image sizes and dtypes, every bad file with its reason, and the warnings."""
        lines = [f"Data: {self.source}",
                 f"{len(self.items)} images in {len(self.classes)} classes; {len(self.bad)} bad files skipped", "",
                 multilabel.counts_report(self.items, self.classes) if self.multilabel
                 else counts_table(self.items, self.classes).to_string() + "\n"]
        info = self.image_info
        if len(info):
            dtypes = ", ".join(f"{k} ({v})" for k, v in info["dtype"].value_counts().items())
            chans = ", ".join(f"{k} ({v})" for k, v in info["channels"].value_counts().sort_index().items())
            lines += [f"Image size: width {info.width.min()}-{info.width.max()}, height {info.height.min()}-"
                      f"{info.height.max()} px (median {int(info.width.median())}x{int(info.height.median())})",
                      f"dtype: {dtypes}; channels in the files: {chans}", ""]
        if len(self.bad):
            lines.append(f"Bad files ({len(self.bad)}: {_kinds(self.bad['reason'])}):")
            lines += [f"  {_rel(p, self.root)}: {r}" for p, r in zip(self.bad["path"], self.bad["reason"])] + [""]
        if self.warnings:
            lines.append(f"Warnings ({len(self.warnings)}):")
            lines += [f"  - {w}" for w in self.warnings]
        return "\n".join(lines).rstrip() + "\n"

    def save_report(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``bad_files.csv`` and ``data_report.txt`` into ``folder``; refuses to overwrite either."""
        return save_report(folder, self.bad, self.report())


def save_report(folder: str | os.PathLike, bad: pd.DataFrame, report: str) -> tuple[Path, Path]:
    """``bad`` as ``bad_files.csv`` and ``report`` as ``data_report.txt`` in ``folder``, neither overwritten."""
    paths = Path(folder) / "bad_files.csv", Path(folder) / "data_report.txt"
    for p in paths:
        if p.exists():
            raise FileExistsError(f"{p} exists: save_report writes into a new run folder only")
    Path(folder).mkdir(parents=True, exist_ok=True)
    bad.to_csv(paths[0], index=False, mode="x")
    with open(paths[1], "x") as f:
        f.write(report)
    return paths


def scan(root: str | os.PathLike | None, *, csv: str | os.PathLike | None = None, channels: int = 3,
         labels: Sequence[str] | None = None, strict: bool = False, allow_outside: bool = False,
         max_bad_fraction: float = 0.2, min_per_class: int = 1, decode: bool | None = True,
         max_pixels: int = MAX_PIXELS, workers: int | None = None, cache: bool = True,
         progress: bool = False) -> Scan:
    """List and check the images of ``root/[split/]<class>/`` or a ``csv`` of ``path,label[,split]``, skipping bad
    files with a reason, or raise DataError when too many are bad (docs/reliability.md; ``decode``: see train.scan)."""
    root, csv = _locate(root, csv)
    warnings: list[str] = []
    if csv is None:
        (rows, source), multi = _folder_rows(root, warnings), False
    else:
        (rows, multi), source = _csv_rows(csv, root, warnings), f"CSV {csv} (data root {root})"
    rows, bad = _precheck(rows, root, allow_outside, labels, multi)
    if strict and bad:
        raise _strict_error(*bad[0])
    decode = len(rows) < HEADER_ONLY_FROM if decode is None else decode
    checked = _check_files(rows["path"].tolist(), channels, decode, max_pixels, workers, strict, cache, progress)
    ok = np.array([isinstance(r, tuple) for r in checked], dtype=bool)
    bad += [(p, r) for p, r, good in zip(rows["path"], checked, ok) if not good]
    good = rows[ok]
    info = pd.DataFrame([r for r in checked if isinstance(r, tuple)],
                        columns=["path", "width", "height", "channels", "dtype"])

    # a non-image file with a non-image extension (notes.txt, labels.json) is listed, not held against the data
    held = [(p, r) for p, r in bad
            if not r.startswith("not an image") or os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
    total = len(good) + len(held)
    if held and len(held) / total > max_bad_fraction:
        raise DataError(f"{len(held)} of {total} files under {root} are bad ({len(held) / total:.0%} > "
                        f"max_bad_fraction {max_bad_fraction:g}): {_bad_summary(held, root)}\nFix or remove them, or "
                        f"raise train.max_bad_fraction if skipping them is fine.")
    if not len(good):
        raise DataError(f"no usable images under {root}: expected one sub-folder per class (root/<class>/image.png), "
                        f"train/ and val/ folders of such, or csv= with path,label[,split]"
                        + (f"; {len(bad)} bad files: {_bad_summary(bad, root)}" if bad else ""))

    if not multi:
        good = _class_warnings(good, rows, min_per_class, labels, warnings)
    classes = sorted(set(labels)) if labels is not None else (
        multilabel.classes_of(good["label"]) if multi else sorted(good["label"].unique()))
    # reset_index, not sort_values(ignore_index=True): pandas 2.0 keeps the index of a frame already in order
    items = good.drop(columns=["_line", "_abs"]).sort_values("path", kind="stable").reset_index(drop=True)
    bad_df = pd.DataFrame(bad, columns=["path", "reason"]).sort_values(["path", "reason"], kind="stable")
    bad_df = bad_df.reset_index(drop=True)
    info = info[info["path"].isin(items["path"])].reset_index(drop=True)
    return Scan(root, source, items, bad_df, classes, {c: i for i, c in enumerate(classes)}, warnings, info, multi)


def counts_table(items: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Images per class (rows, then 'total') and split (columns, then 'total')."""
    table = pd.crosstab(items["label"], items["split"].replace("", "unsplit")).reindex(index=classes, fill_value=0)
    table = table[[s for s in (*SPLITS, "unsplit") if s in table.columns]]
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    table.index.name, table.columns.name = "class", None
    return table


def is_packed(data: str | os.PathLike | None) -> bool:
    """Whether ``data`` was written by ``finetune pack``: a folder with its index file, or any URL (s3://...)."""
    return data is not None and ("://" in str(data) or (Path(data) / PACK_INDEX).is_file())


def split(items: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0,
          groups: str | Callable[[str], str] | None = None, multilabel: bool = False) -> pd.DataFrame:
    """A copy of ``items`` with ``split`` filled in: with no 'val' row, a seeded per-class (or per-label)
    ``val_fraction`` of train moves to val, each of ``groups`` (column, callable or file-name regex) on one side."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = items.copy()
    out["split"] = out["split"].replace("", "train") if "split" in out else "train"
    if (out["split"] == "val").any() or val_fraction == 0:
        return out
    pool = out[out["split"] == "train"].sort_values("path", kind="stable")
    if groups is not None:
        val = _grouped(pool, groups, val_fraction, seed)
    elif multilabel:
        val = stratified_val(pool, val_fraction, seed)
    else:
        val = []
        for label, rows in pool.groupby("label", sort=True):
            # one generator per class: adding a class does not reshuffle the others
            rng = np.random.default_rng([seed, zlib.crc32(str(label).encode())])
            val += list(rng.permutation(rows.index.to_numpy())[: int(_n_val(len(rows), val_fraction))])
    out.loc[val, "split"] = "val"
    return out


class ImageDataset:
    """``(tensor, label_index)`` (``multi``: a 0/1 vector) per row of ``items``: read, ``intensity``, ``transform``.
    With ``skipped`` (a CSV) a failed read is recorded there and returned as its ImageError (see drop_failed)."""

    def __init__(self, items: pd.DataFrame, class_to_idx: dict[str, int], channels: int = 3,
                 transform: Callable[[np.ndarray], torch.Tensor] | None = None,
                 intensity: Callable[[np.ndarray], np.ndarray] | None = None, *, max_pixels: int = MAX_PIXELS,
                 skipped: str | os.PathLike | None = None, multi: bool = False):
        unknown = sorted(set(multilabel.classes_of(items["label"]) if multi else items["label"]) - set(class_to_idx))
        if unknown:
            raise DataError(f"labels {unknown[:5]} are not in the class map {list(class_to_idx)[:10]}: "
                            f"build class_to_idx from the same scan as the items")
        self.paths = items["path"].to_numpy(dtype=str)  # numpy, not a list of str: loader workers share the pages
        self.targets = (multilabel.matrix(items["label"], sorted(class_to_idx, key=class_to_idx.get)) if multi else
                        np.array([class_to_idx[c] for c in items["label"]], dtype=np.int64))
        self.channels, self.transform, self.intensity, self.max_pixels = channels, transform, intensity, max_pixels
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | ImageError:
        target = int(self.targets[index]) if self.targets.ndim == 1 else self.targets[index]  # multi: a 0/1 vector
        return self.sample(str(self.paths[index]), target)

    def sample(self, path: str, target: int | np.ndarray, data: bytes | None = None) -> tuple | ImageError:
        """One image (from ``data``, its bytes, if given) read, scaled and transformed, or its recorded error."""
        try:
            img = read_image(path, self.channels, max_pixels=self.max_pixels, data=data)
        except ImageError as e:
            error = ImageError(path, f"{e.reason} (it passed the scan: changed since? re-run the scan)")
            if self.skipped is None:
                raise error from None
            record_skipped(self.skipped, path, e.reason)
            return error
        img = self.intensity(img) if self.intensity is not None else to_unit_float(img)
        if self.transform is not None:
            return self.transform(img), target
        import torch
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), target


def record_skipped(csv: str | os.PathLike, path: str, reason: str) -> None:
    """Append a ``path,reason`` row to ``csv`` in one O_APPEND write, so loader workers and ranks never interleave."""
    with open(csv, "a") as f:
        f.write(pd.DataFrame({"path": [path], "reason": [reason]}).to_csv(index=False, header=False))


def drop_failed(batch: list) -> Any:
    """DataLoader collate leaving out failed reads (ImageError); a batch of failures only stops training."""
    good = [b for b in batch if not isinstance(b, ImageError)]
    if not good:
        raise DataError(f"every image of a batch failed to read, e.g. {batch[0]}: the data changed since the scan "
                        f"(moved, unmounted?); fix it and resume the run")
    from torch.utils.data import default_collate
    return default_collate(good)


def default_workers() -> int:
    """Loader processes: with a GPU every core but one (at most 8); on the CPU one, none on 2 cores or fewer."""
    import torch
    cores = _cores()
    return max(0, min(8, cores - 1)) if torch.cuda.is_available() else int(cores > 2)


def bad_files_note(bad: pd.DataFrame, listed_in: str | os.PathLike) -> str | None:
    """The console's one line about skipped files (a ``reason`` column): how many, which kinds, where listed."""
    if not len(bad):
        return None
    return f"{len(bad)} unreadable file{'s' if len(bad) > 1 else ''} skipped ({_kinds(bad['reason'])}): " \
           f"listed in {listed_in}"


# -- finding files -----------------------------------------------------------------------------------------------

def _locate(root, csv) -> tuple[Path, Path | None]:
    if csv is not None:
        csv = Path(csv)
        if root is not None and not csv.is_absolute() and not csv.exists():
            csv = Path(root) / csv
        if not csv.is_file():
            raise DataError(f"CSV file {csv} not found")
        root = csv.parent if root is None else root
    if root is None:
        raise DataError("scan needs a data root folder or a csv")
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    return root, (None if csv is None else Path(os.path.abspath(csv)))


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _LITTER


def _subdirs(folder: Path) -> list[Path]:
    return sorted(Path(e.path) for e in os.scandir(folder) if e.is_dir() and not _ignored(e.name))


def _walk(folder: Path) -> list[str]:
    """Every non-ignored file under ``folder``, following directory symlinks once (no loops)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if not _ignored(f)]
    return found


def _folder_rows(root: Path, warnings: list[str]) -> tuple[pd.DataFrame, str]:
    top = _subdirs(root)
    names = [d.name.lower() for d in top]
    if "train" in names or (top and all(n in _SPLIT_NAMES for n in names)):
        pairs = []
        for d in top:
            name = _SPLIT_NAMES.get(d.name.lower())
            if name is None:
                warnings.append(f"folder '{d.name}' next to train/ is not a split (train, val, test): ignored")
                continue
            pairs += [(name, c) for c in _subdirs(d)]
            _stray(d, root, warnings)
        source = f"class folders in {', '.join(d.name + '/' for d in top if d.name.lower() in _SPLIT_NAMES)} of {root}"
    else:
        pairs = [("", c) for c in top]
        source = f"class folders in {root}"
    _stray(root, root, warnings)
    rows = []
    for name, class_dir in pairs:
        files = _walk(class_dir)
        if not files:
            warnings.append(f"empty class folder '{_rel(class_dir, root)}': ignored, not a class")
        rows += [(f, class_dir.name, name) for f in files]
    return pd.DataFrame(rows, columns=["path", "label", "split"], dtype=str).assign(_line=0, _abs=False), source


def _stray(folder: Path, root: Path, warnings: list[str]) -> None:
    """Warn about image files lying next to the class folders, where no label can be read from the path."""
    stray = sorted(e.path for e in os.scandir(folder) if not e.is_dir() and not _ignored(e.name)
                   and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
    if stray:
        warnings.append(f"{len(stray)} image files directly in '{_rel(folder, root)}' are in no class folder: ignored "
                        f"(e.g. {os.path.basename(stray[0])})")


def _csv_rows(csv: Path, root: Path, warnings: list[str]) -> tuple[pd.DataFrame, bool]:
    """The CSV's rows (path, label, split, _line, _abs, extra columns) and whether it is multi-label."""
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as e:
        raise DataError(f"cannot read {csv} as CSV: {e}") from None
    df.columns = [str(c).strip() for c in df.columns]
    try:
        multi = multilabel.csv_labels(df, str(csv)) if "path" in [c.lower() for c in df.columns] else None
    except multilabel.LabelError as e:
        raise DataError(str(e)) from None
    if multi is not None:
        df, found = multi
        warnings += found
    lower = {c.lower(): c for c in df.columns}
    if "path" not in lower or "label" not in lower:
        raise DataError(f"{csv} needs columns path,label[,split] (multi-label: path,labels with ';' between labels, "
                        f"or one 0/1 column a label); it has {list(df.columns)}")
    df = df.rename(columns={lower[k]: k for k in ("path", "label", "split") if k in lower})
    df["split"] = df["split"] if "split" in df else ""
    for col in ("path", "label", "split"):
        df[col] = df[col].str.strip()
    if os.sep == "/":
        df["path"] = df["path"].str.replace("\\", "/")  # a CSV written on Windows
    df["_abs"] = [os.path.isabs(p) for p in df["path"]]  # written in full: the user means that file
    df["path"] = [os.path.normpath(os.path.join(root, p)) if p else "" for p in df["path"]]
    df["_line"] = np.arange(len(df)) + 2  # the header is line 1
    extra = [c for c in df.columns if c not in ("path", "label", "split", "_line", "_abs")]
    return df[["path", "label", "split", "_line", "_abs", *extra]], multi is not None


def _precheck(rows: pd.DataFrame, root: Path, allow_outside: bool, labels,
              multi: bool = False) -> tuple[pd.DataFrame, list]:
    """Row-level problems found without opening files: bad CSV cells, outside root, duplicates, unknown labels."""
    bad, drop = [], np.zeros(len(rows), dtype=bool)
    lines = rows["_line"].to_numpy()
    where = [f" (line {n})" if n else "" for n in lines]

    def mark(i, reason):
        drop[i] = True
        bad.append((rows["path"].iat[i] or f"line {lines[i]}", reason))

    paths, labels_ = rows["path"].tolist(), rows["label"].tolist()  # lists: iterating pandas columns is slow
    for i, (path, label, name) in enumerate(zip(paths, labels_, rows["split"].tolist())):
        if not path:
            mark(i, f"bad row: empty path{where[i]}")
        elif not label and not multi:  # an empty multi-label cell is an image with none of the labels
            mark(i, f"bad row: empty label{where[i]}")
        elif name.lower() not in _SPLIT_NAMES:
            mark(i, f"bad row: split '{name}' is not train, val or test{where[i]}")
    if not allow_outside:
        real_root, real_dirs = os.path.realpath(root), {}
        for i, (path, given_abs) in enumerate(zip(paths, rows["_abs"].tolist())):
            if not drop[i] and not given_abs and not _inside(path, real_root, real_dirs):
                mark(i, f"outside data root: resolves to {os.path.realpath(path)}, not under {real_root} "
                        f"(set allow_outside=True if intended)")
    key = pd.Series([os.path.normcase(p) for p in rows["path"]])
    for _, group in key[~drop & key.duplicated(keep=False).to_numpy()].groupby(key, sort=False):
        idx = group.index.to_numpy()
        if rows["label"].iloc[idx].nunique() == 1 and rows["split"].iloc[idx].str.lower().nunique() == 1:
            for i in idx[1:]:
                mark(i, f"duplicate: same file as line {lines[idx[0]]}{where[i]}" if lines[idx[0]] else "duplicate")
        else:
            found = ", ".join(rows["label"].iat[i] + (f" ({rows['split'].iat[i]})" if rows["split"].iat[i] else "")
                              for i in idx)
            for i in idx:
                mark(i, f"conflicting labels: listed as {found}{where[i]}")
    if labels is not None:
        known = set(labels)
        for i, label in enumerate(labels_):
            unknown = [lab for lab in (label.split(multilabel.SEP) if multi else [label]) if lab and lab not in known]
            if not drop[i] and unknown:
                mark(i, f"unknown label: '{unknown[0]}' is not in the label list{where[i]}")
    rows = rows[~drop].copy()
    rows["split"] = [_SPLIT_NAMES[s.lower()] for s in rows["split"]]
    return rows, bad


def _inside(path: str, real_root: str, real_dirs: dict[str, str]) -> bool:
    """Whether ``path`` resolves under ``real_root``; folders are resolved once each (``real_dirs`` caches)."""
    folder, name = os.path.split(path)
    if folder not in real_dirs:
        real_dirs[folder] = os.path.realpath(folder)
    real = os.path.join(real_dirs[folder], name)
    real = os.path.realpath(real) if os.path.islink(real) else real
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _check_files(paths: list[str], channels: int, decode: bool, max_pixels: int, workers: int | None,
                 strict: bool, cache: bool, progress: bool) -> list:
    """(path, width, height, native channels, dtype) per usable file, else why it is bad; strict: stop at the first."""
    check = functools.partial(_examine_all, decode=decode, max_pixels=max_pixels, workers=workers,
                              progress=progress, stop=strict)
    found = scancache.checked(paths, decode, max_pixels, check) if cache else check(paths)
    results, names = [], {}  # str(dtype) per file would cost seconds per million
    for path, info in zip(paths, found):
        if isinstance(info, ImageInfo):
            try:
                _check_channels(path, info.channels, info.alpha, channels)
                name = names.get(info.dtype) or names.setdefault(info.dtype, str(info.dtype))
                info = (path, info.width, info.height, info.channels, name)
            except ImageError as e:
                info = e.reason
        if strict and not isinstance(info, tuple):
            raise _strict_error(path, info)
        results.append(info)
    return results


def _examine_all(paths: list[str], decode: bool, max_pixels: int, workers: int | None, progress: bool,
                 stop: bool) -> list:
    """images.examine on every path: threads for a few files, processes (decoding holds the GIL) for many."""
    cores = _cores()
    many = len(paths) >= _PROCESSES_FROM and cores > 1
    if many:
        # fork as DataLoader workers do: a spawned or forkserver child would re-run an unguarded user script
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        pool = ProcessPoolExecutor(workers or cores, mp_context=context)
    else:
        pool = ThreadPoolExecutor(workers or min(16, cores + 4))
    check = functools.partial(examine, decode=decode, max_pixels=max_pixels)
    bar = tqdm(total=len(paths), desc="checking images" if decode else "reading headers", unit=" files",
               disable=not progress or len(paths) < _PROCESSES_FROM, mininterval=1.0)
    try:
        results = []
        for r in pool.map(check, paths, chunksize=256 if many else 1):
            results.append(r)
            bar.update()
            if stop and isinstance(r, str):
                break
        return results + [""] * (len(paths) - len(results))  # unchecked after a stop: never reached
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _strict_error(path: str, reason: str) -> DataError:
    return DataError(f"{path}: {reason}\nstrict mode stops at the first bad file: fix or remove it, or set "
                     f"strict=False to skip bad files and list them in the report")


def _bad_summary(bad: list, root: Path) -> str:
    """Counts per reason kind and the first few files, for an error raised before any report is written."""
    examples = "".join(f"\n  {_rel(p, root)}: {r}" for p, r in bad[:5])
    return _kinds([r for _, r in bad]) + examples + ("\n  ..." if len(bad) > 5 else "")


def _kinds(reasons) -> str:
    """'kind count, ...' of bad-file reasons (kind: the text before the first ':'), the most common first."""
    kinds = pd.Series(list(reasons)).astype(str).str.split(":").str[0].value_counts()
    return ", ".join(f"{k} {v}" for k, v in kinds.items())


def _class_warnings(good: pd.DataFrame, rows: pd.DataFrame, min_per_class: int, labels, warnings: list[str]):
    """Warn about classes that vanish, are tiny or miss a split; drop those under ``min_per_class``."""
    counts = good["label"].value_counts()
    warnings += [f"class '{label}' has no readable images: not a class"
                 for label in sorted(set(rows["label"]) - set(counts.index))]
    small = sorted(c for c, n in counts.items() if n < min_per_class)
    if small:
        warnings.append(f"classes with fewer than min_per_class={min_per_class} images left out: "
                        + ", ".join(f"{c} ({counts[c]})" for c in small))
        good = good[~good["label"].isin(small)]
        counts = counts.drop(small)
    warnings += [f"class '{label}' from the label list has no images"
                 for label in sorted(set(labels or ()) - set(counts.index))]
    warnings += [f"class '{label}' has only 1 image: it stays in train, with none to validate on"
                 for label in sorted(counts.index[counts == 1])]
    for name in ("train", "val"):
        if (good["split"] == name).any():
            missing = sorted(set(counts.index) - set(good.loc[good["split"] == name, "label"]))
            if missing and counts[missing].max() > 1:
                warnings.append(f"classes with no {name} images: {', '.join(missing)}")
    return good


def _rel(path, root: Path) -> str:
    rel = os.path.relpath(path, root)
    return str(path) if rel.startswith("..") else rel


# -- splitting ---------------------------------------------------------------------------------------------------

def _n_val(n: np.ndarray | int, fraction: float):
    """Val images for a class of ``n``: round(n * fraction), at least 1 and at most n - 1; none for n < 2."""
    n = np.asarray(n)
    return np.where(n < 2, 0, np.clip(np.floor(n * fraction + 0.5), 1, n - 1)).astype(int)


def _grouped(pool: pd.DataFrame, groups, fraction: float, seed: int) -> list:
    """Whole groups move in or out of val, in a seeded order, while that brings the classes closer to their
    targets (train keeps one image of each class); the best of 32 orders wins."""
    if callable(groups):
        keys = pool["path"].map(groups)
    elif groups in pool.columns:
        keys = pool[groups]
    else:
        pattern = re.compile(groups)
        matches = [pattern.search(os.path.basename(p)) for p in pool["path"]]
        keys = pd.Series([m and (m.group(1) if pattern.groups else m.group(0)) for m in matches], index=pool.index)
    missing = keys.isna() | (keys.astype(str) == "")
    if missing.any():
        example = os.path.basename(pool.loc[missing, "path"].iloc[0])
        raise DataError(f"split groups {groups!r} give no group for {int(missing.sum())} files (e.g. {example}): "
                        f"fix the pattern so every file name matches, or they could leak between train and val")
    keys = keys.astype(str)
    table = pd.crosstab(keys, pool["label"])  # groups x classes, both sorted
    counts = table.to_numpy()
    n = counts.sum(axis=0)
    target = _n_val(n, fraction)
    rng = np.random.default_rng(seed)

    def cost(v):  # squared relative miss: one class far off costs more than several slightly off
        return (((target - v) / np.maximum(n, 1)) ** 2).sum()

    def keeps_train(v):
        return bool(np.all((n - v >= 1) | (n == 0)))

    best = None
    for _ in range(32):
        taken, val = np.zeros(len(table), dtype=bool), np.zeros(len(n), dtype=int)
        order, improved = rng.permutation(len(table)), True
        while improved:  # hill-climb: move single groups in or out while that helps
            improved = False
            for g in order:
                new = val - counts[g] if taken[g] else val + counts[g]
                if keeps_train(new) and cost(new) < cost(val) - 1e-9:
                    taken[g], val, improved = not taken[g], new, True
        for c in np.flatnonzero((val == 0) & (target > 0)):  # still unvalidated: add its smallest fitting group
            for g in sorted(np.flatnonzero((counts[:, c] > 0) & ~taken), key=lambda g: (counts[g].sum(), g)):
                if keeps_train(val + counts[g]):
                    taken[g], val = True, val + counts[g]
                    break
        if best is None or cost(val) < best[0]:
            best = cost(val), taken
    return pool.index[keys.isin(table.index[best[1]]).to_numpy()].tolist()
