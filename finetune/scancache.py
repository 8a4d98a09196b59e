"""What the scan learnt about each file, in ``$FINETUNE_HOME/scan.sqlite`` (WAL: safe for several runs at once) keyed
by path, size and mtime; an unusable cache is skipped with a warning, never a reason to fail a scan."""
from __future__ import annotations

import logging
import os
import sqlite3
from typing import Callable

import numpy as np

from .fileio import finetune_home
from .images import ImageInfo

log = logging.getLogger("finetune")

_SCHEMA = """CREATE TABLE IF NOT EXISTS files (
    path TEXT NOT NULL, max_pixels INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    decoded INTEGER NOT NULL, width INTEGER, height INTEGER, channels INTEGER, alpha INTEGER, dtype TEXT,
    reason TEXT, PRIMARY KEY (path, max_pixels))"""
# reasons that say nothing about the file's content (permissions, a vanished file): checked again every time
_TRANSIENT = ("unreadable", "missing file")

Result = ImageInfo | str


def checked(paths: list[str], decode: bool, max_pixels: int,
            check: Callable[[list[str]], list[Result]]) -> list[Result]:
    """``check(paths)`` for the files the cache does not know in this state, cached results for the others, in the
    order of ``paths``. A header-only result does not answer ``decode``."""
    stats = [_stat(p) for p in paths]
    path = finetune_home() / "scan.sqlite"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(_SCHEMA)
    except (sqlite3.Error, OSError) as e:
        log.warning("scan cache %s unusable (%s): checking every file", path, e)
        return check(paths)
    with db:
        known = _lookup(db, paths, max_pixels)
        results: list[Result | None] = []
        for p, st in zip(paths, stats):
            row = known.get(p)  # a file that cannot be stat'ed (st None) is never a hit
            results.append(row[3] if row and row[:2] == st and (row[2] or not decode) else None)
        todo = [i for i, r in enumerate(results) if r is None]
        for i, r in zip(todo, check([paths[i] for i in todo])):
            results[i] = r
        _store(db, [(paths[i], stats[i], results[i]) for i in todo], decode, max_pixels)
    db.close()
    return results


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _lookup(db: sqlite3.Connection, paths: list[str], max_pixels: int) -> dict[str, tuple]:
    """path -> (size, mtime_ns, decoded, result) for the cached ``paths``, joined through a temporary table."""
    db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (path TEXT PRIMARY KEY)")
    db.execute("DELETE FROM wanted")
    db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", ((p,) for p in paths))
    rows = db.execute("SELECT f.path, size, mtime_ns, decoded, width, height, channels, alpha, dtype, reason "
                      "FROM files f JOIN wanted w ON f.path = w.path WHERE max_pixels = ?", (max_pixels,))
    dtypes: dict[str, np.dtype] = {}  # np.dtype(name) per row would cost seconds per million
    return {p: (size, mtime, decoded, reason if reason is not None else
                ImageInfo(width, height, channels, dtypes.get(dtype) or dtypes.setdefault(dtype, np.dtype(dtype)),
                          bool(alpha)))
            for p, size, mtime, decoded, width, height, channels, alpha, dtype, reason in rows}


def _store(db: sqlite3.Connection, entries: list, decode: bool, max_pixels: int) -> None:
    rows = []
    for p, st, r in entries:
        if st is None or (isinstance(r, str) and (not r or r.startswith(_TRANSIENT))):  # '': never reached
            continue
        info = (r.width, r.height, r.channels, int(r.alpha), str(r.dtype), None) if isinstance(r, ImageInfo) \
            else (None, None, None, None, None, r)
        rows.append((p, max_pixels, *st, int(decode), *info))
    try:
        db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    except sqlite3.Error as e:
        log.warning("scan cache not updated (%s): the next scan checks these %d files again", e, len(rows))
