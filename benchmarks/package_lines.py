"""Lines of ``finetune/`` by the issue that wrote them: ``git blame`` on every module, each line given to the commit
that last wrote it, looking through pure refactoring commits (``--ignore-revs-file``), the commit then classed by
its subject. Issue 12 asks for a smaller package than the 5,607 lines of its day; issues 13-17 came after it.

    python benchmarks/package_lines.py --look-through 784bdf8..HEAD   # the line cut of issue 12's last session

Lines of commits matched by none of the patterns count as the core (conservative: a tidy-up commit's lines are core).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
#: commit subject pattern -> the later issue whose feature the commit added (first match wins)
LATER = [
    (r"[Mm]ulti-label|multilabel", "13 multi-label"),
    (r"explain|[Gg]rad-cam|Grad-CAM|\bserve\b|Tracking|loggers|lr[ -]find|optim\.lr: find", "14 look inside"),
    (r"Issue 15|auto recipe|refit", "15 no task left behind"),
    (r"issue 16|First-hour|new commands", "16 first hour"),
    (r"Scan cache|Scan process pool|finetune pack|Merge scale|imports torch where a dataset is read", "17 data at scale"),
]


def blame(path: Path, ignore: Path | None) -> list[str]:
    """The subject of the commit behind each line of ``path``."""
    cmd = ["git", "blame", "-w", "-M", "-C", "--line-porcelain", str(path.relative_to(ROOT))]
    if ignore is not None:
        cmd[2:2] = ["--ignore-revs-file", str(ignore)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line[len("summary "):] for line in out.splitlines() if line.startswith("summary ")]


def issue_of(subject: str) -> str:
    return next((name for pattern, name in LATER if re.search(pattern, subject)), "core (before 13-17, 12, tidy-ups)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--look-through", help="a revision range of refactoring commits to see through, e.g. A..HEAD")
    args = ap.parse_args()
    ignore = None
    if args.look_through:
        revs = subprocess.run(["git", "rev-list", "--no-merges", args.look_through], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
        ignore = Path(tempfile.mkdtemp()) / "ignore-revs.txt"
        ignore.write_text(revs)
    rows = []
    for path in sorted((ROOT / "finetune").rglob("*.py")):
        counts = Counter(issue_of(s) for s in blame(path, ignore))
        rows += [{"file": str(path.relative_to(ROOT)), "issue": k, "lines": v} for k, v in counts.items()]
    table = pd.DataFrame(rows).pivot_table(index="file", columns="issue", values="lines", fill_value=0, aggfunc="sum")
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    print(table.astype(int).to_string())


if __name__ == "__main__":
    main()
