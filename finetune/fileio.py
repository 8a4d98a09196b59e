"""Writing files so that a reader or a kill never leaves half of one (no finetune imports: any module may use it)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | Path, data: bytes | str | Callable[[IO[bytes]], Any]) -> None:
    """Write bytes, text, or what ``data(file)`` writes, to a temporary file beside ``path``, then rename: readers
    never see half a file, and a kill during the write leaves the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finetune_home() -> Path:
    """``$FINETUNE_HOME``, default ``~/.cache/finetune``: converted weights, cached features, the scan cache."""
    return Path(os.environ.get("FINETUNE_HOME") or Path.home() / ".cache" / "finetune").expanduser()
