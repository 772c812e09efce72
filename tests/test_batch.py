"""Batch plumbing without the scoring engine: inputs, names, manifest, lock, parts, runners."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from biopsyquant._batch_exec import ProcessRunner, SerialRunner, make_runner
from biopsyquant._batch_inputs import compile_pattern, gather_inputs
from biopsyquant._batch_io import (
    LOCK,
    OutputLock,
    OutputLockedError,
    file_sha256,
    merge_object_tables,
    part_stem,
    write_part,
)
from biopsyquant.errors import InputError


def _touch(p: Path, data: bytes = b"II*\x00") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_pattern_fields_and_marker(tmp_path):
    _touch(tmp_path / "P01_pre_CD163.tif")
    _touch(tmp_path / "P01_post_il1b.tiff")
    _touch(tmp_path / "P02-x_baseline_MHC-I.svs")
    _touch(tmp_path / "readme.txt", b"hello")
    inputs, skipped, notes = gather_inputs([tmp_path], pattern="{patient}_{timepoint}_{marker}")
    got = {s.path.name: (s.fields["patient"], s.fields["timepoint"], s.marker) for s in inputs}
    assert got == {"P01_pre_CD163.tif": ("P01", "pre", "CD163"),
                   "P01_post_il1b.tiff": ("P01", "post", "IL-1b"),
                   "P02-x_baseline_MHC-I.svs": ("P02-x", "baseline", "MHC-I")}
    assert [Path(s["path"]).name for s in skipped] == ["readme.txt"]
    assert not notes


def test_unmatched_name_or_unknown_marker_is_a_per_file_problem(tmp_path):
    _touch(tmp_path / "oddname.tif")
    _touch(tmp_path / "P1_pre_CD68.tif")
    inputs, _, _ = gather_inputs([tmp_path], pattern="{patient}_{timepoint}_{marker}")
    problems = {s.path.name: s.problem for s in inputs}
    assert "does not match --pattern" in problems["oddname.tif"]
    assert "CD68" in problems["P1_pre_CD68.tif"]
    # with a fallback marker the unmatched file is scored with it
    inputs, _, _ = gather_inputs([tmp_path / "oddname.tif"], marker="cd163",
                                 pattern="{patient}_{timepoint}_{marker}")
    assert inputs[0].marker == "CD163" and inputs[0].problem is None


def test_pattern_needs_fields():
    with pytest.raises(InputError, match="no \\{field\\}"):
        compile_pattern("plain")
    assert compile_pattern("{a}-{b}").match("x-y-z").groupdict() == {"a": "x", "b": "y-z"}


def test_duplicate_names_get_unique_names(tmp_path):
    _touch(tmp_path / "a" / "s1.tif")
    _touch(tmp_path / "b" / "s1.tif")
    _touch(tmp_path / "b" / "s1.svs")
    _touch(tmp_path / "b" / "s2.tif")
    inputs, _, notes = gather_inputs([tmp_path], marker="CD163", recursive=True)
    names = [s.name for s in inputs]
    assert len(set(n.lower() for n in names)) == len(names) == 4
    assert "s2" in names
    assert "s1" in names and len(notes) == 2 and all("s1" in n for n in notes)
    # deterministic: the same inputs get the same names again
    again, _, _ = gather_inputs([tmp_path], marker="CD163", recursive=True)
    assert [s.name for s in again] == names


def test_non_recursive_folder_scan_lists_subfolders(tmp_path):
    _touch(tmp_path / "x.tif")
    _touch(tmp_path / "sub" / "y.tif")
    inputs, skipped, _ = gather_inputs([tmp_path], marker="CD163")
    assert [s.path.name for s in inputs] == ["x.tif"]
    assert any("recursive" in s["reason"] for s in skipped)


def test_manifest(tmp_path):
    _touch(tmp_path / "imgs" / "one.tif")
    (tmp_path / "ex.geojson").write_text("{}")
    m = tmp_path / "cohort.csv"
    m.write_text("path,patient,timepoint,marker,mpp,exclusions,responder\n"
                 "imgs/one.tif,P1,pre,IL1RA,0.5,ex.geojson,yes\n"
                 "imgs/missing.tif,P1,post,CD163,,,no\n")
    inputs, _, _ = gather_inputs(None, manifest=m)
    a, b = inputs
    assert a.path == tmp_path / "imgs" / "one.tif" and a.marker == "IL-1Ra" and a.mpp == 0.5
    assert a.exclusions == tmp_path / "ex.geojson"
    assert a.fields == {"patient": "P1", "timepoint": "pre", "responder": "yes"}
    assert b.mpp is None and b.marker == "CD163"
    m.write_text("file,marker\nx.tif,CD163\n")
    with pytest.raises(InputError, match="needs a 'path' column"):
        gather_inputs(None, manifest=m)
    m.write_text("path,mpp\nx.tif,abc\n")
    with pytest.raises(InputError, match="row 2: mpp 'abc'"):
        gather_inputs(None, manifest=m)


def test_no_inputs_is_an_error(tmp_path):
    _touch(tmp_path / "notes.txt", b"x")
    with pytest.raises(InputError, match="no input images"):
        gather_inputs([tmp_path], marker="CD163")


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": sleeper.pid,
                                                 "host": socket.gethostname(),
                                                 "started": "now"}))
        with pytest.raises(OutputLockedError, match=f"pid {sleeper.pid}"):
            OutputLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
    lock = OutputLock(tmp_path).acquire()  # holder is dead now: stale lock taken over
    assert lock.stale_taken["pid"] == sleeper.pid
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_lock_is_exclusive_between_two_holders(tmp_path):
    code = ("import sys,time; from biopsyquant._batch_io import OutputLock;"
            "l=OutputLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match="in use by another biopsyquant run"):
            OutputLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_parts_merge_union_of_columns(tmp_path):
    write_part(tmp_path, "a__CD163", record={"row": {"slide": "a"}},
               cells=pd.DataFrame({"slide": ["a", "a"], "marker": "CD163", "x_px": [1.0, 2.0],
                                   "grade": [0, 3]}), fibers=None)
    write_part(tmp_path, "b__IL-1b", record={"row": {"slide": "b"}},
               cells=pd.DataFrame({"slide": ["b"], "marker": "IL-1b", "x_px": [5.0],
                                   "kind": ["capillary"]}), fibers=None)
    n = merge_object_tables(tmp_path, ["b__IL-1b", "a__CD163", "missing"], "cells",
                            lead=["slide", "marker"])
    df = pd.read_csv(tmp_path / "cells.csv")
    assert n == 3
    assert list(df.columns) == ["slide", "marker", "x_px", "kind", "grade"]
    assert df["slide"].tolist() == ["b", "a", "a"]
    assert df["grade"].isna().tolist() == [True, False, False]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_part_stem_is_safe():
    assert part_stem("../x y", "IL-1b") == "_x_y__IL-1b"
    assert "/" not in part_stem("a/b", "CD163")


def test_sha256(tmp_path):
    p = _touch(tmp_path / "f.bin", b"abc")
    assert file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _square(x):
    if x < 0:
        raise ValueError(f"negative {x}")
    return x * x


def _drain(runner, values):
    futs = {runner.submit(_square, v): v for v in values}
    out = {}
    pending = set(futs)
    while pending:
        done, pending = runner.wait(pending)
        for f in done:
            try:
                out[futs[f]] = f.result()
            except ValueError as exc:
                out[futs[f]] = str(exc)
    return out


def test_serial_and_process_runners_agree():
    values = [3, -1, 5, 0]
    expected = {3: 9, -1: "negative -1", 5: 25, 0: 0}
    assert _drain(SerialRunner(), values) == expected
    runner = ProcessRunner(2)
    try:
        assert _drain(runner, values) == expected
    finally:
        runner.close()
    assert isinstance(make_runner(1), SerialRunner)
    with pytest.raises(InputError, match="--workers"):
        make_runner(0)


def test_demo_picks_sample_slides_not_truth_files(tmp_path):
    from biopsyquant._cli.demo import sample_images

    for name in ("P01_baseline_CD163.tif", "P01_baseline_CD163.fibers.tif",
                 "P01_baseline_CD163.compartments.tif", "P02_month6_IL-1b.tif", "notes.tif"):
        _touch(tmp_path / name)
    assert [p.name for p in sample_images(tmp_path)] == ["P01_baseline_CD163.tif",
                                                          "P02_month6_IL-1b.tif"]
