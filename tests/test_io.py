"""The checked readers every stage uses: a missing or damaged file is one DatasetError naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sraseg.errors import DatasetError
from sraseg.io import load_array, portable_path, read_json, read_table, staged_outputs, write_json


def test_read_json_round_trip_and_errors(tmp_path: Path):
    path = tmp_path / "meta.json"
    write_json(path, {"size": np.int64(96), "loss": np.float32(0.5)})
    assert read_json(path) == {"size": 96, "loss": 0.5}
    with pytest.raises(DatasetError, match=r"gone\.json: file not found \(run the embed stage first\)"):
        read_json(tmp_path / "gone.json", hint="run the embed stage first")
    path.write_text('{"size": 96,')  # truncated by a crash
    with pytest.raises(DatasetError, match=r"meta\.json: not valid JSON"):
        read_json(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match=r"meta\.json: not valid JSON"):
        read_json(path)


def test_read_table_checks_file_and_columns(tmp_path: Path):
    path = tmp_path / "slices.parquet"
    pd.DataFrame({"slice_id": [0, 1], "split": ["train", "val"], "extra": [1.0, 2.0]}).to_parquet(path)
    table = read_table(path, ("slice_id", "split"))
    assert list(table["split"]) == ["train", "val"] and "extra" in table.columns
    with pytest.raises(DatasetError, match=r"slices\.parquet: missing column\(s\) labeled"):
        read_table(path, ("slice_id", "labeled"))
    path.write_bytes(path.read_bytes()[:40])  # a half-written file
    with pytest.raises(DatasetError, match=r"slices\.parquet: unreadable parquet file"):
        read_table(path)
    with pytest.raises(DatasetError, match=r"none\.parquet: file not found"):
        read_table(tmp_path / "none.parquet")


def test_load_array_memmaps_and_rejects_damage(tmp_path: Path):
    path = tmp_path / "images.npy"
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.save(path, data)
    mapped = load_array(path)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, data)
    loaded = load_array(path, mmap=False)
    assert not isinstance(loaded, np.memmap) and np.array_equal(loaded, data)
    path.write_bytes(b"not numpy at all")
    with pytest.raises(DatasetError, match=r"images\.npy: not a readable \.npy array"):
        load_array(path)


def test_staged_outputs_leave_nothing_when_the_stage_fails(tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_outputs(out) as staged:
        staged.path("half.txt").write_text("partial")
        raise RuntimeError("crash")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staged_outputs(out) as staged:
        staged.path("sub/done.txt").write_text("ok")
    assert (out / "sub" / "done.txt").read_text() == "ok" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_portable_path_is_relative_under_the_working_directory_else_as_written(tmp_path: Path, monkeypatch):
    work, elsewhere = tmp_path / "work it's;$x é", tmp_path / "data"
    (work / "results" / "prepared").mkdir(parents=True)
    (elsewhere / "raw" / "patient001").mkdir(parents=True)
    (work / "link").symlink_to(elsewhere)
    monkeypatch.chdir(work)
    assert portable_path(work / "results" / "prepared") == "results/prepared"
    assert portable_path(str(work)) == "."
    assert portable_path("results/prepared") == "results/prepared"  # relative: as written
    assert portable_path("../data/raw") == "../data/raw"
    assert portable_path(elsewhere / "raw") == str(elsewhere / "raw")  # outside: as written
    # a file a reader found under its resolved folder is named through the folder as the user wrote it
    found = (elsewhere / "raw" / "patient001").resolve()
    assert portable_path(found, "link/raw") == "link/raw/patient001"
    assert portable_path(found, elsewhere / "raw") == str(elsewhere / "raw" / "patient001")
    assert portable_path(work / "results" / "x.json", elsewhere) == "results/x.json"  # not under root
