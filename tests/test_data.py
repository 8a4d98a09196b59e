"""scan, split and ImageDataset on tiny trees made here: every kind of bad input, CSV == folders, seeded splits."""
import builtins
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import finetune.images as images
from finetune.data import DataError, ImageDataset, Scan, scan, split
from finetune.images import ImageError

RNG = np.random.default_rng(0)


# -- file makers -----------------------------------------------------------------------------------------------------

def _noise(h, w, c=3, dtype=np.uint8):
    return RNG.integers(0, np.iinfo(dtype).max, (h, w, c) if c else (h, w), endpoint=True).astype(dtype)


def _fake_png(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _exif_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_noise(8, 12)).save(path, exif=exif)


def _truncated(path):
    Image.fromarray(_noise(32, 32)).save(path, format="PNG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


GOOD = {  # kind -> (extension, writer)
    "rgb": ("png", lambda p: Image.fromarray(_noise(8, 8)).save(p)),
    "gray": ("png", lambda p: Image.fromarray(_noise(8, 8, 0)).save(p)),
    "jpeg": ("jpg", lambda p: Image.fromarray(_noise(8, 8)).save(p)),
    "rgba": ("png", lambda p: Image.fromarray(_noise(8, 8, 4), "RGBA").save(p)),
    "palette": ("png", lambda p: Image.fromarray(_noise(8, 8)).quantize(4).save(p)),
    "cmyk": ("jpg", lambda p: Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(p)),
    "gray16": ("png", lambda p: Image.fromarray(_noise(8, 8, 0, np.uint16)).save(p)),
    "exif": ("jpg", _exif_jpeg),
    "tiff16": ("tif", lambda p: tifffile.imwrite(p, _noise(8, 8, 3, np.uint16), photometric="rgb")),
}
BAD = {  # kind -> (extension, writer, reason kind)
    "empty": ("png", lambda p: p.write_bytes(b""), "empty file"),
    "text_as_jpg": ("jpg", lambda p: p.write_text("not really a photo"), "not an image"),
    "truncated": ("png", _truncated, "truncated"),
    "corrupt": ("png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2), "corrupt"),
    "huge": ("png", lambda p: _fake_png(p, 20_000, 20_000), "too large"),
}
NOTES = ("txt", lambda p: p.write_text("labelled by Ann"), "not an image")  # listed, not counted against the data
LITTER = [".DS_Store", "Thumbs.db", "._a.jpg", "desktop.ini", ".hidden/a.png", "__MACOSX/a.png"]


def make(path: Path, kind: str = "rgb") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GOOD[kind][1] if kind in GOOD else BAD[kind][1]
    writer(path)
    return path


def tree(root: Path, spec: dict[str, int], kind="rgb") -> Path:
    """``spec``: {'cat': 3, 'train/dog': 2}: that many good images in each folder."""
    for folder, n in spec.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make(root / folder / f"{i}.{GOOD[kind][0]}", kind)
    return root


def kinds(s: Scan) -> dict[str, str]:
    return {os.path.basename(p): r.split(":")[0] for p, r in zip(s.bad["path"], s.bad["reason"])}


def names(s: Scan) -> set[str]:
    return {os.path.relpath(p, s.root) for p in s.items["path"]}


# -- folders ---------------------------------------------------------------------------------------------------------

def test_class_folders(tmp_path):
    s = scan(tree(tmp_path, {"dog": 2, "cat": 3}))
    assert list(s.items.columns) == ["path", "label", "split"]
    assert s.classes == ["cat", "dog"] and s.class_to_idx == {"cat": 0, "dog": 1}
    assert s.items["label"].tolist() == ["cat"] * 3 + ["dog"] * 2
    assert (s.items["split"] == "").all() and s.bad.empty and s.warnings == []
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in s.items["path"])
    assert s.items["path"].is_monotonic_increasing


def test_nested_folders_belong_to_their_class(tmp_path):
    make(tmp_path / "cat" / "2019" / "a.png")
    make(tmp_path / "dog" / "b.png")
    assert names(scan(tmp_path)) == {"cat/2019/a.png", "dog/b.png"}


def test_split_folders_used_as_given(tmp_path):
    tree(tmp_path, {"train/cat": 2, "train/dog": 2, "val/cat": 1, "val/dog": 1, "test/cat": 1})
    s = scan(tmp_path)
    assert s.classes == ["cat", "dog"]
    assert s.items.groupby("split").size().to_dict() == {"test": 1, "train": 4, "val": 2}
    pd.testing.assert_frame_equal(split(s.items, seed=5), s.items)


def test_split_folder_aliases_and_stray_folders(tmp_path):
    tree(tmp_path, {"train/cat": 1, "validation/cat": 1, "notes/cat": 1})
    s = scan(tmp_path)
    assert sorted(s.items["split"]) == ["train", "val"]
    assert any("'notes'" in w and "ignored" in w for w in s.warnings)


def test_images_next_to_class_folders_are_ignored_with_a_warning(tmp_path):
    tree(tmp_path, {"cat": 1})
    make(tmp_path / "loose.png")
    s = scan(tmp_path)
    assert len(s.items) == 1 and s.bad.empty
    assert any("loose.png" in w for w in s.warnings)


def test_each_bad_kind_is_listed_with_its_reason(tmp_path):
    tree(tmp_path, {"cat": 10})
    for kind, (ext, _, _) in BAD.items():
        make(tmp_path / "cat" / f"{kind}.{ext}", kind)
    s = scan(tmp_path, max_bad_fraction=1.0)
    assert kinds(s) == {f"{k}.{ext}": reason for k, (ext, _, reason) in BAD.items()}
    assert len(s.items) == 10 and s.classes == ["cat"]


def test_truncated_jpeg_found_only_by_decoding(tmp_path):
    tree(tmp_path, {"cat": 4})
    Image.fromarray(_noise(64, 64)).save(tmp_path / "cat" / "t.jpg")
    data = (tmp_path / "cat" / "t.jpg").read_bytes()
    (tmp_path / "cat" / "t.jpg").write_bytes(data[: len(data) // 2])
    assert kinds(scan(tmp_path)) == {"t.jpg": "truncated"}
    assert kinds(scan(tmp_path, decode=False, cache=False)) == {}  # headers alone look fine
    assert kinds(scan(tmp_path, decode=False)) == {"t.jpg": "truncated"}  # the cache remembers the full decode


def test_decode_false_still_catches_header_problems(tmp_path):
    tree(tmp_path, {"cat": 4})
    make(tmp_path / "cat" / "e.png", "empty")
    make(tmp_path / "cat" / "h.png", "huge")
    s = scan(tmp_path, decode=False, max_bad_fraction=1)
    assert kinds(s) == {"e.png": "empty file", "h.png": "too large"}
    assert s.image_info["width"].tolist() == [8] * 4


def test_notes_are_listed_but_not_counted_against_the_data(tmp_path):
    tree(tmp_path, {"cat": 2})
    for i in range(3):
        NOTES[1](tmp_path / "cat" / f"notes{i}.txt")
    s = scan(tmp_path)  # 3 of 5 files are not images, yet no DataError
    assert kinds(s) == {f"notes{i}.txt": "not an image" for i in range(3)}
    assert len(s.items) == 2


def test_litter_and_hidden_files_are_silently_ignored(tmp_path):
    tree(tmp_path, {"cat": 2})
    for name in LITTER:
        (tmp_path / "cat" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cat" / name).write_bytes(b"\0\0junk")
    (tmp_path / ".Trash").mkdir()
    make(tmp_path / ".Trash" / "x.png")
    s = scan(tmp_path)
    assert s.bad.empty and s.warnings == [] and len(s.items) == 2 and s.classes == ["cat"]


def test_every_mode_reads_fine(tmp_path):
    for kind, (ext, _) in GOOD.items():
        make(tmp_path / "x" / f"{kind}.{ext}", kind)
    s = scan(tmp_path)
    assert s.bad.empty and len(s.items) == len(GOOD)
    info = s.image_info.set_index(s.image_info["path"].map(os.path.basename))
    assert info.loc["gray16.png", "dtype"] == "uint16" and info.loc["tiff16.tif", "dtype"] == "uint16"
    assert tuple(info.loc["exif.jpg", ["width", "height"]]) == (8, 12)  # rotated by EXIF
    assert info.loc["rgba.png", "channels"] == 4 and info.loc["gray.png", "channels"] == 1


def test_huge_image_is_bad_and_the_limit_is_configurable(tmp_path):
    tree(tmp_path, {"cat": 4})
    make(tmp_path / "cat" / "huge.png", "huge")
    s = scan(tmp_path)
    assert s.bad["reason"].iloc[0].startswith("too large")
    Image.fromarray(_noise(4, 4)).save(tmp_path / "cat" / "small.png")
    s = scan(tmp_path, max_pixels=63, max_bad_fraction=1)  # 8x8 images are now too large too
    assert set(kinds(s).values()) == {"too large"} and len(s.bad) == 5 and names(s) == {"cat/small.png"}


def test_wrong_channels_are_bad(tmp_path):
    tree(tmp_path, {"cells": 4})
    tifffile.imwrite(tmp_path / "cells" / "four.tif", _noise(8, 8, 4), photometric="minisblack", planarconfig="contig")
    s = scan(tmp_path)
    assert kinds(s) == {"four.tif": "wrong channels"}
    assert "file has 4 channels, the recipe reads 3" in s.bad["reason"].iloc[0]


def test_empty_class_folder_is_not_a_class(tmp_path):
    tree(tmp_path, {"cat": 2})
    (tmp_path / "dog").mkdir()
    (tmp_path / "bird").mkdir()
    (tmp_path / "bird" / ".DS_Store").write_bytes(b"x")
    s = scan(tmp_path)
    assert s.classes == ["cat"]
    assert any("empty class folder 'dog'" in w for w in s.warnings)
    assert any("empty class folder 'bird'" in w for w in s.warnings)


def test_class_with_only_bad_files_is_not_a_class(tmp_path):
    tree(tmp_path, {"cat": 9})
    make(tmp_path / "dog" / "a.png", "empty")
    s = scan(tmp_path)
    assert s.classes == ["cat"] and any("class 'dog' has no readable images" in w for w in s.warnings)


def test_single_image_class_is_kept_and_stays_in_train(tmp_path):
    s = scan(tree(tmp_path, {"cat": 5, "dog": 1}))
    assert s.classes == ["cat", "dog"]
    assert any("'dog' has only 1 image" in w for w in s.warnings)
    out = split(s.items, 0.2, seed=0)
    assert out.loc[out["label"] == "dog", "split"].tolist() == ["train"]
    assert (out.loc[out["label"] == "cat", "split"] == "val").sum() == 1


def test_min_per_class_leaves_small_classes_out(tmp_path):
    s = scan(tree(tmp_path, {"cat": 5, "dog": 2}), min_per_class=3)
    assert s.classes == ["cat"] and set(s.items["label"]) == {"cat"}
    assert any("min_per_class=3" in w and "dog (2)" in w for w in s.warnings)


def test_label_list_fixes_classes_and_flags_unknown_folders(tmp_path):
    s = scan(tree(tmp_path, {"cat": 5, "dog": 1}), labels=["fox", "cat"])
    assert s.classes == ["cat", "fox"] and s.class_to_idx == {"cat": 0, "fox": 1}
    assert set(kinds(s).values()) == {"unknown label"}
    assert any("'fox' from the label list has no images" in w for w in s.warnings)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_by_permissions(tmp_path):
    tree(tmp_path, {"cat": 5})
    os.chmod(tmp_path / "cat" / "0.png", 0)
    try:
        assert kinds(scan(tmp_path)) == {"0.png": "unreadable"}
    finally:
        os.chmod(tmp_path / "cat" / "0.png", 0o644)


def test_unreadable_file_when_open_is_refused(tmp_path, monkeypatch):
    tree(tmp_path, {"cat": 5})
    locked = str(tmp_path / "cat" / "0.png")

    def refuse(path, *args, **kw):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return builtins.open(path, *args, **kw)

    monkeypatch.setattr(images, "open", refuse, raising=False)
    assert kinds(scan(tmp_path)) == {"0.png": "unreadable"}


def test_symlink_out_of_the_root_is_refused_unless_allowed(tmp_path):
    root = tree(tmp_path / "data", {"cat": 4})
    make(tmp_path / "elsewhere" / "x.png")
    make(tmp_path / "elsewhere_dir" / "y.png")
    os.symlink(tmp_path / "elsewhere" / "x.png", root / "cat" / "x.png")
    os.symlink(tmp_path / "elsewhere_dir", root / "dog")
    s = scan(root, max_bad_fraction=1)
    assert kinds(s) == {"x.png": "outside data root", "y.png": "outside data root"}
    assert "set allow_outside" in s.bad["reason"].iloc[0]
    s = scan(root, allow_outside=True)
    assert s.bad.empty and {"cat/x.png", "dog/y.png"} <= names(s) and s.classes == ["cat", "dog"]


def test_symlink_inside_the_root_is_fine_and_loops_end(tmp_path):
    tree(tmp_path, {"cat": 2, "dog": 1})
    os.symlink(tmp_path / "cat" / "0.png", tmp_path / "dog" / "alias.png")
    os.symlink(tmp_path / "cat", tmp_path / "cat" / "loop")
    s = scan(tmp_path)
    assert s.bad.empty and "dog/alias.png" in names(s) and len(s.items) == 4


def test_broken_symlink_is_a_missing_file(tmp_path):
    tree(tmp_path, {"cat": 4})
    os.symlink(tmp_path / "gone.png", tmp_path / "cat" / "gone.png")
    assert kinds(scan(tmp_path)) == {"gone.png": "missing file"}


# -- too many bad, strict, nothing found -----------------------------------------------------------------------------

def test_too_many_bad_files_raise(tmp_path):
    tree(tmp_path, {"cat": 4})
    make(tmp_path / "cat" / "e.png", "empty")  # 1 of 5 = 20%: allowed
    assert len(scan(tmp_path).bad) == 1
    make(tmp_path / "cat" / "f.png", "truncated")  # 2 of 6
    with pytest.raises(DataError) as e:
        scan(tmp_path)
    msg = str(e.value)
    assert "2 of 6 files" in msg and "max_bad_fraction" in msg and "e.png: empty file" in msg
    assert len(scan(tmp_path, max_bad_fraction=0.5).bad) == 2


def test_strict_stops_at_the_first_bad_file(tmp_path):
    tree(tmp_path, {"cat": 3})
    assert len(scan(tmp_path, strict=True).items) == 3
    make(tmp_path / "cat" / "2b.png", "corrupt")
    make(tmp_path / "cat" / "9.png", "empty")
    with pytest.raises(DataError, match=r"2b\.png: corrupt.*\n.*strict"):
        scan(tmp_path, strict=True, max_bad_fraction=1)


def test_strict_catches_row_problems_too(tmp_path):
    tree(tmp_path, {"cat": 2})
    (tmp_path / "l.csv").write_text("path,label\ncat/0.png,cat\nmissing.png,cat\n")
    with pytest.raises(DataError, match="missing.png: missing file"):
        scan(tmp_path, csv="l.csv", strict=True)


def test_no_images_at_all(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="no usable images"):
        scan(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        scan(tmp_path / "nope")


# -- CSV -------------------------------------------------------------------------------------------------------------

def write_csv(path: Path, rows: list[tuple], header="path,label,split") -> Path:
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_csv_equals_folders(tmp_path):
    tree(tmp_path, {"train/cat": 3, "train/dog": 2, "val/cat": 1, "val/dog": 2, "test/dog": 1})
    make(tmp_path / "train" / "cat" / "bad.png", "empty")
    folder = scan(tmp_path)
    rows = [(os.path.relpath(p, tmp_path), lab, sp) for p, lab, sp in folder.items.itertuples(index=False)]
    rows.append(("train/cat/bad.png", "cat", "train"))
    csv = write_csv(tmp_path / "labels.csv", rows[::-1])
    from_csv = scan(tmp_path, csv=csv)
    pd.testing.assert_frame_equal(from_csv.items, folder.items)
    pd.testing.assert_frame_equal(from_csv.bad, folder.bad)
    assert from_csv.class_to_idx == folder.class_to_idx and from_csv.classes == folder.classes


def test_csv_paths_relative_to_its_folder_when_no_root(tmp_path):
    tree(tmp_path / "data", {"cat": 2})
    csv = write_csv(tmp_path / "data" / "l.csv", [("cat/0.png", "cat", ""), ("cat/1.png", "cat", "")])
    s = scan(None, csv=csv)
    assert s.root == tmp_path / "data" and len(s.items) == 2
    s = scan(tmp_path / "data", csv="l.csv")  # a relative csv is looked up in root
    assert len(s.items) == 2


def test_csv_extra_columns_kept_windows_paths_and_case(tmp_path):
    tree(tmp_path, {"cat": 2})
    (tmp_path / "l.csv").write_text("Path , Label,plate\ncat\\0.png, cat ,P1\ncat\\1.png,cat,P2\n")
    s = scan(tmp_path, csv="l.csv")
    assert list(s.items.columns) == ["path", "label", "split", "plate"]
    assert s.items["plate"].tolist() == ["P1", "P2"] and s.classes == ["cat"]


def test_csv_labels_stay_strings(tmp_path):
    tree(tmp_path, {"x": 3})
    write_csv(tmp_path / "l.csv", [("x/0.png", "01", ""), ("x/1.png", "NA", ""), ("x/2.png", "10", "")])
    s = scan(tmp_path, csv="l.csv")
    assert s.classes == ["01", "10", "NA"]


def test_csv_missing_files(tmp_path):
    tree(tmp_path, {"cat": 4})
    write_csv(tmp_path / "l.csv", [(f"cat/{i}.png", "cat", "") for i in range(5)])
    s = scan(tmp_path, csv="l.csv")
    assert kinds(s) == {"4.png": "missing file"} and len(s.items) == 4


def test_csv_unknown_labels(tmp_path):
    tree(tmp_path, {"cat": 5})
    write_csv(tmp_path / "l.csv", [(f"cat/{i}.png", "cat" if i else "cta", "") for i in range(5)])
    s = scan(tmp_path, csv="l.csv", labels=["cat", "dog"])
    assert kinds(s) == {"0.png": "unknown label"} and "'cta'" in s.bad["reason"].iloc[0]
    assert s.classes == ["cat", "dog"]


def test_csv_duplicate_rows_keep_the_first(tmp_path):
    tree(tmp_path, {"cat": 5})
    rows = [(f"cat/{i}.png", "cat", "") for i in range(5)] + [("cat/0.png", "cat", ""), ("./cat/0.png", "cat", "")]
    s = scan(tmp_path, csv=write_csv(tmp_path / "l.csv", rows), max_bad_fraction=0.5)
    assert len(s.items) == 5
    assert s.bad["reason"].tolist() == ["duplicate: same file as line 2 (line 7)",
                                        "duplicate: same file as line 2 (line 8)"]


def test_csv_same_file_with_two_labels_is_bad_twice(tmp_path):
    tree(tmp_path, {"cat": 6})
    rows = [(f"cat/{i}.png", "cat", "") for i in range(6)] + [("cat/0.png", "dog", "")]
    s = scan(tmp_path, csv=write_csv(tmp_path / "l.csv", rows), max_bad_fraction=0.5)
    assert s.bad["reason"].str.startswith("conflicting labels").tolist() == [True, True]
    assert set(s.bad["path"]) == {str(tmp_path / "cat" / "0.png")}
    assert len(s.items) == 5 and s.classes == ["cat"]


def test_csv_relative_paths_climbing_out_of_the_root_are_bad_absolute_ones_are_taken(tmp_path):
    root = tree(tmp_path / "data", {"cat": 6})
    for name in ("a.png", "b.png", "c.png"):
        make(tmp_path / name)
    rows = [(f"cat/{i}.png", "cat", "") for i in range(6)]
    rows += [("../a.png", "cat", ""), (str(tmp_path / "b.png"), "dog", ""), ("cat/../../c.png", "dog", "")]
    write_csv(root / "l.csv", rows)
    s = scan(root, csv="l.csv", max_bad_fraction=1)
    assert kinds(s) == {"a.png": "outside data root", "c.png": "outside data root"}
    assert "set allow_outside=True if intended" in s.bad["reason"].iloc[0]
    assert len(s.items) == 7 and str(tmp_path / "b.png") in set(s.items["path"])  # written in full: meant
    assert list(s.items.columns) == ["path", "label", "split"]
    s = scan(root, csv="l.csv", allow_outside=True)
    assert len(s.items) == 9 and s.bad.empty and s.classes == ["cat", "dog"]


def test_csv_of_absolute_paths_only_from_another_folder(tmp_path):
    tree(tmp_path / "images", {"cat": 2, "dog": 2})
    rows = [(tmp_path / "images" / c / f"{i}.png", c, "") for c in ("cat", "dog") for i in range(2)]
    (tmp_path / "lists").mkdir()
    s = scan(None, csv=write_csv(tmp_path / "lists" / "items.csv", rows))
    assert s.bad.empty and len(s.items) == 4 and s.classes == ["cat", "dog"]


def test_csv_bad_rows(tmp_path):
    tree(tmp_path, {"cat": 9})
    rows = [(f"cat/{i}.png", "cat", "train") for i in range(6)]
    rows += [("cat/6.png", "", "train"), ("", "cat", ""), ("cat/8.png", "cat", "holdout")]
    s = scan(tmp_path, csv=write_csv(tmp_path / "l.csv", rows), max_bad_fraction=1)
    assert sorted(r.split(" (")[0] for r in s.bad["reason"]) == [
        "bad row: empty label", "bad row: empty path", "bad row: split 'holdout' is not train, val or test"]


def test_csv_without_the_needed_columns(tmp_path):
    (tmp_path / "l.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(DataError, match="needs columns path,label"):
        scan(tmp_path, csv="l.csv")
    with pytest.raises(DataError, match="not found"):
        scan(tmp_path, csv="nope.csv")


# -- report --------------------------------------------------------------------------------------------------------

def test_report_and_save_report(tmp_path):
    root = tree(tmp_path / "data", {"train/cat": 3, "train/dog": 2, "val/cat": 1, "val/dog": 1})
    make(root / "train" / "cat" / "broken.png", "truncated")
    (root / "train" / "bird").mkdir()
    s = scan(root, max_bad_fraction=0.5)
    text = s.report()
    assert "7 images in 2 classes; 1 bad files skipped" in text
    assert re.search(r"cat\s+3\s+1\s+4", text) and re.search(r"total\s+5\s+2\s+7", text)
    assert "train/cat/broken.png: truncated" in text and "empty class folder 'train/bird'" in text
    bad_csv, txt = s.save_report(tmp_path / "run1")
    assert pd.read_csv(bad_csv)["path"].tolist() == [str(root / "train" / "cat" / "broken.png")]
    assert txt.read_text() == text
    with pytest.raises(FileExistsError):
        s.save_report(tmp_path / "run1")
    assert txt.read_text() == text


# -- split -----------------------------------------------------------------------------------------------------------

def items_of(counts: dict[str, int], **columns) -> pd.DataFrame:
    rows = [(f"/d/{c}/{i:03d}.png", c) for c, n in counts.items() for i in range(n)]
    df = pd.DataFrame(rows, columns=["path", "label"]).assign(split="")
    return df.assign(**{k: v(df) for k, v in columns.items()})


def test_split_is_stratified():
    df = items_of({"a": 50, "b": 10, "c": 2, "d": 1})
    out = split(df, 0.2, seed=0)
    val = out[out["split"] == "val"].groupby("label").size().to_dict()
    assert val == {"a": 10, "b": 2, "c": 1}
    assert set(out["split"]) == {"train", "val"}


def test_split_is_seeded_and_order_free():
    df = items_of({"a": 40, "b": 30})
    one = split(df, seed=1)
    assert one["split"].tolist() == split(df, seed=1)["split"].tolist()
    assert one["split"].tolist() != split(df, seed=2)["split"].tolist()
    shuffled = split(df.sample(frac=1, random_state=0), seed=1).sort_index()
    assert shuffled["split"].tolist() == one["split"].tolist()


def test_split_of_one_class_ignores_other_classes():
    a = split(items_of({"a": 30, "b": 30}), seed=3)
    b = split(items_of({"a": 30, "z": 7}), seed=3)
    assert a.loc[a.label == "a", "split"].tolist() == b.loc[b.label == "a", "split"].tolist()


def test_split_keeps_test_rows_and_given_val():
    df = items_of({"a": 10})
    df.loc[:1, "split"] = "test"
    out = split(df, seed=0)
    assert out["split"].iloc[:2].tolist() == ["test", "test"] and (out["split"] == "val").sum() == 2
    assert split(out, seed=9)["split"].tolist() == out["split"].tolist()
    assert (split(df, val_fraction=0)["split"].iloc[2:] == "train").all()
    with pytest.raises(ValueError):
        split(df, val_fraction=1)


def _well(p):
    return os.path.basename(p)[:2]


@pytest.mark.parametrize("groups", ["well", _well, r"^(\d\d)\d"])
def test_split_keeps_groups_on_one_side(groups):
    counts = {"a": 100, "b": 50, "c": 50}
    df = items_of(counts, well=lambda d: d["path"].map(_well))  # group '00': files 000-009 of every class
    out = split(df, 0.2, seed=0, groups=groups)
    by_group = out.groupby(out["path"].map(_well))["split"].nunique()
    assert (by_group == 1).all()
    frac = out[out["split"] == "val"].groupby("label").size() / pd.Series(counts)
    assert frac.between(0.1, 0.35).all(), frac


def test_split_groups_regex_must_match_every_file():
    df = items_of({"a": 10})
    with pytest.raises(DataError, match="give no group for 10 files"):
        split(df, groups=r"^PLLT\d+")


def test_split_class_in_one_group_stays_in_train():
    df = items_of({"a": 20, "b": 5})  # b's five files are all in group '00'
    out = split(df, 0.2, seed=0, groups=_well)
    assert (out.loc[out.label == "b", "split"] == "train").all()
    assert (out.loc[out.label == "a", "split"] == "val").sum() == 10  # one whole group of a's two


# -- ImageDataset ------------------------------------------------------------------------------------------------

def test_dataset_items_as_float_tensors(tmp_path):
    make(tmp_path / "a" / "x.png", "gray16")
    make(tmp_path / "b" / "y.jpg", "rgb")
    s = scan(tmp_path)
    ds = ImageDataset(s.items, s.class_to_idx, channels=3)
    assert len(ds) == 2
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (3, 8, 8) and y == 0
    raw = np.asarray(Image.open(tmp_path / "a" / "x.png"))
    torch.testing.assert_close(x[0], torch.from_numpy(raw / 65535.0).float())  # 16 bits, not 8
    assert ds[1][1] == 1 and 0 <= ds[1][0].min() and ds[1][0].max() <= 1


def test_dataset_calls_intensity_then_transform(tmp_path):
    s = scan(tree(tmp_path, {"a": 1}))
    seen = []
    ds = ImageDataset(s.items, s.class_to_idx, 1,
                      transform=lambda a: seen.append(a.dtype) or torch.zeros(1),
                      intensity=lambda a: np.full(a.shape, 0.5, np.float32))
    assert ds[0][0].tolist() == [0.0] and seen == [np.float32]


def test_dataset_file_gone_after_scan_names_it(tmp_path):
    s = scan(tree(tmp_path, {"a": 2}))
    ds = ImageDataset(s.items, s.class_to_idx)
    os.remove(tmp_path / "a" / "1.png")
    with pytest.raises(ImageError, match=r"1\.png: missing file.*re-run the scan"):
        ds[1]


def test_dataset_refuses_labels_outside_the_class_map(tmp_path):
    s = scan(tree(tmp_path, {"a": 1, "b": 1}))
    with pytest.raises(DataError, match=r"\['b'\]"):
        ImageDataset(s.items, {"a": 0})


def test_dataset_works_in_a_dataloader_with_workers(tmp_path):
    s = scan(tree(tmp_path, {"a": 3, "b": 3}))
    loader = torch.utils.data.DataLoader(ImageDataset(s.items, s.class_to_idx), batch_size=4, num_workers=2)
    xs, ys = zip(*loader)
    assert torch.cat(ys).tolist() == [0, 0, 0, 1, 1, 1] and sum(len(x) for x in xs) == 6


# -- property: random trees of good, bad and litter files give an exact report ------------------------------------

CLASS_NAMES = ["cat", "dog", "Zebra", "two words"]
FILE_KINDS = [*GOOD, *BAD, "notes", "litter"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(CLASS_NAMES), st.lists(st.sampled_from(FILE_KINDS), max_size=5),
                       min_size=1, max_size=3))
def test_report_is_exact_for_random_trees(spec):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        good, bad, sidecars = set(), {}, 0
        for label, files in spec.items():
            (root / label).mkdir()
            for i, kind in enumerate(files):
                if kind == "litter":
                    (root / label / LITTER[i % len(LITTER)]).parent.mkdir(exist_ok=True)
                    (root / label / LITTER[i % len(LITTER)]).write_bytes(b"junk")
                    continue
                ext = NOTES[0] if kind == "notes" else (GOOD.get(kind) or BAD[kind])[0]
                path = root / label / f"{i}_{kind}.{ext}"
                if kind == "notes":
                    NOTES[1](path)
                    bad[f"{label}/{path.name}"], sidecars = NOTES[2], sidecars + 1
                    continue
                make(path, kind)
                if kind in GOOD:
                    good.add(f"{label}/{path.name}")
                else:
                    bad[f"{label}/{path.name}"] = BAD[kind][2]
        counted = len(bad) - sidecars
        if not good:
            with pytest.raises(DataError):
                scan(root, max_bad_fraction=1.0)
            return
        s = scan(root, max_bad_fraction=1.0)
        assert names(s) == good
        assert {os.path.relpath(p, root): r.split(":")[0] for p, r in zip(s.bad["path"], s.bad["reason"])} == bad
        classes = sorted({g.split("/")[0] for g in good})
        assert s.classes == classes and s.class_to_idx == {c: i for i, c in enumerate(classes)}
        report = s.report()
        assert all(name in report for name in bad)
        raises = counted / (len(good) + counted) > 0.2
        try:
            scan(root)
            assert not raises
        except DataError:
            assert raises
        ds = ImageDataset(s.items, s.class_to_idx, channels=3)
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape[0] == 3 and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
            assert y == s.class_to_idx[s.items["label"].iloc[i]]


@pytest.mark.parametrize("balance", ["none", "sampler"])
def test_sampler_balance_weights_each_class_equally(balance):
    from finetune.datamodule import ImageDataModule
    items = pd.DataFrame({"path": [f"/x/{i}.png" for i in range(10)], "label": ["a"] * 8 + ["b"] * 2,
                          "split": "train"})
    dm = ImageDataModule(items, {"a": 0, "b": 1}, read_channels=3, train_transform=None, eval_transform=None,
                         intensity=None, num_workers=0, balance=balance)
    weights = dm.train_dataloader().sampler.weights
    if balance == "none":
        assert weights is None
    else:  # 1 / class count an image: each class draws half the samples in expectation
        assert weights[:8].sum().item() == pytest.approx(1.0) and weights[8:].sum().item() == pytest.approx(1.0)
        assert weights[0].item() == pytest.approx(1 / 8) and weights[9].item() == pytest.approx(1 / 2)
