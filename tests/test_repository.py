"""The repository itself: no folder of one machine in any tracked file, and the dependency floors CI proves are the
ones setup.cfg declares."""
import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the repository and data roots of the machines this project was built on; written split so this file passes
MACHINE_ROOTS = re.compile("/" + "work/|/home/[a-z]|/Users/[A-Za-z]")


def _tracked() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_tracked_file_names_a_folder_of_one_machine():
    found = []
    for path in _tracked():
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
            if MACHINE_ROOTS.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not found, "absolute paths of one machine (use ../shared/datasets or FINETUNE_DATASETS):\n" + "\n".join(found)


def _requirements() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = {}
    for line in cfg["options"]["install_requires"].strip().splitlines():
        name, floor = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", line.strip()).groups()
        reqs[name.lower()] = floor
    return reqs


def test_floor_constraints_pin_exactly_the_declared_floors():
    pins = {}
    for line in (ROOT / ".ci" / "constraints-floor.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    declared = _requirements()
    missing = sorted(set(declared) - set(pins))
    assert not missing, f"setup.cfg floors with no pin in .ci/constraints-floor.txt: {missing}"
    differ = {k: (declared[k], pins[k]) for k in declared 
              if not (pins[k] == declared[k] or pins[k].startswith(declared[k] + "."))}
    assert not differ, f"setup.cfg floor and CI pin differ (floor, pin): {differ}"
