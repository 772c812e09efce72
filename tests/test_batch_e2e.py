"""End-to-end batch scoring from generated slide files on disk.

A folder holds a plain TIFF, a pyramidal tiled JPEG TIFF (scored in tiles), an SVS-like file,
a truncated TIFF, a text file and a second file with a duplicate name in a sub-folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_batch_files import (
    section_rgb,
    write_plain_tiff,
    write_pyramid_jpeg,
    write_svs_like,
    write_truncated,
)

from biopsyquant._batch_io import LOCK, OutputLockedError, file_sha256
from biopsyquant.batch import SLIDE_LEAD_COLUMNS, score_folder
from biopsyquant.cli import main

PATTERN = "{patient}_{timepoint}_{marker}"
#: small slides stay whole; the 1024² pyramid is scored in 4 tiles of 512
OVERRIDES = ["tiling.max_whole_image_px=600000"]
SMALL = 768


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cohort")
    write_plain_tiff(d / "P01_pre_CD163.tif", section_rgb("CD163", 11, SMALL), 0.5)
    write_pyramid_jpeg(d / "P01_post_IL-1b.tif", section_rgb("IL-1b", 12, 1024), 0.5)
    write_svs_like(d / "P02_pre_MHC-I.svs", section_rgb("MHC-I", 13, SMALL), 0.5)
    write_truncated(d / "P02_post_CD163.tif", section_rgb("CD163", 11, SMALL))
    (d / "notes.txt").write_text("scanner log\n")
    (d / "dup").mkdir()
    shutil.copy(d / "P01_pre_CD163.tif", d / "dup" / "P01_pre_CD163.tif")
    return d


@pytest.fixture(scope="module")
def local_run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("out_local")
    result = score_folder([cohort], out=out, pattern=PATTERN, recursive=True,
                          overrides=OVERRIDES, tile_size=512, progress=False)
    return result, out


def _no_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_folder_outputs(cohort, local_run):
    result, out = local_run
    assert (result.n_ok, result.n_error) == (4, 1)
    assert not result.ok
    slides = pd.read_csv(out / "slides.csv")
    assert list(slides.columns[: len(SLIDE_LEAD_COLUMNS)]) == SLIDE_LEAD_COLUMNS
    by = slides.set_index("slide")
    # the broken file is an error row with a clear message; the other slides are complete
    err = by.loc["P02_post_CD163"]
    assert err["status"] == "error" and "P02_post_CD163.tif" in err["error"]
    assert pd.isna(err["tissue_area_mm2"])
    ok = slides[slides["status"] == "ok"]
    assert set(ok["marker"]) == {"CD163", "IL-1b", "MHC-I"}
    assert (ok["mpp"] == 0.5).all()
    assert by.loc["P02_pre_MHC-I", "mpp_source"] == "svs"
    assert by.loc["P01_post_IL-1b", "mpp_source"] == "tiff-resolution"
    assert (by.loc["P01_post_IL-1b", ["patient", "timepoint"]] == ["P01", "post"]).all()
    # every marker's own summary columns, union across markers (blank where not applicable)
    assert by.loc["P01_pre_CD163", "cells_per_mm2"] >= 0
    assert pd.isna(by.loc["P01_post_IL-1b", "cells_per_mm2"])
    assert 0 <= by.loc["P01_post_IL-1b", "positive_area_pct"] <= 100
    assert 0 <= by.loc["P02_pre_MHC-I", "fibers_positive_pct"] <= 100
    assert (ok["tissue_area_mm2"] > 0.05).all() and (ok["n_fibers"] > 10).all()
    # duplicate file name: both scored, named apart, same numbers (same pixels)
    dups = ok[ok["path"].str.endswith("P01_pre_CD163.tif")]
    assert len(dups) == 2 and dups["slide"].nunique() == 2
    num = dups.select_dtypes("number")
    assert np.allclose(num.iloc[0], num.iloc[1], equal_nan=True)
    assert [Path(s["path"]).name for s in result.skipped_files] == ["notes.txt"]

    # object tables carry the slide; positions in level-0 px and µm
    cells = pd.read_csv(out / "cells.csv")
    fibers = pd.read_csv(out / "fibers.csv")
    assert list(cells.columns[:2]) == ["slide", "marker"]
    cd = cells[cells["slide"] == "P01_pre_CD163"]
    assert len(cd) == by.loc["P01_pre_CD163", "cells_detected"]
    assert np.allclose(cd["x_um"], cd["x_px"] * 0.5)
    for name, row in ok.set_index("slide").iterrows():
        f = fibers[fibers["slide"] == name]
        assert len(f) == row["n_fibers"]
        size = 1024 if name == "P01_post_IL-1b" else SMALL
        assert f["x_px"].between(0, size).all() and f["y_px"].between(0, size).all()
        assert f["fiber_id"].tolist() == list(range(1, len(f) + 1))
    # tiled slide: fibers from all four tiles
    il = fibers[fibers["slide"] == "P01_post_IL-1b"]
    assert (il["x_px"] > 512).any() and (il["x_px"] < 512).any()

    # QC overlays, provenance
    from PIL import Image

    for stem in ok["overlay"]:
        with Image.open(out / stem) as im:
            assert im.size[0] > 400 and im.size[1] > 300
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["biopsyquant_version"]
    assert set(run["settings"]) == {"CD163", "IL-1b", "MHC-I"}
    info = {s["slide"]: s for s in run["slides"]}
    il_info = info["P01_post_IL-1b"]
    assert il_info["file"]["sha256"] == file_sha256(cohort / "P01_post_IL-1b.tif")
    assert il_info["provenance"]["tiling"]["n_tiles"] == 4
    assert len(il_info["provenance"]["stain_model"]["vectors"]) == 3
    assert il_info["provenance"]["mpp_source"] == "tiff-resolution"
    assert info["P01_pre_CD163"]["provenance"]["tiling"]["tiled"] is False
    assert "traceback" in info["P02_post_CD163"]
    assert not _no_temp_files(out) and not (out / LOCK).exists()


def test_rerun_skips_finished_slides_and_exits_nonzero(cohort, local_run, capsys):
    _, out = local_run
    before = {p.name: p.read_bytes() for p in (out / ".parts").glob("*.csv")}
    code = main(["score", str(cohort), "--recursive", "--pattern", PATTERN, "--out", str(out),
                 "--set", OVERRIDES[0], "--tile-size", "512", "-q"])
    err = capsys.readouterr().err
    assert code == 1  # the broken file is still broken
    assert "4 ok (4 already done, skipped), 1 error(s)" in err
    assert "P02_post_CD163" in err
    after = {p.name: p.read_bytes() for p in (out / ".parts").glob("*.csv")}
    assert before == after
    slides = pd.read_csv(out / "slides.csv")
    assert (slides["status"] == "ok").sum() == 4


@pytest.mark.slow
def test_manifest_exclusions_parquet_and_changed_settings(cohort, tmp_path):
    from biopsyquant.tissue import save_exclusions

    img = tmp_path / "in"
    img.mkdir()
    shutil.copy(cohort / "P01_pre_CD163.tif", img / "a.tif")
    square = np.array([[100, 100], [400, 100], [400, 400], [100, 400]], float)
    save_exclusions([square], tmp_path / "a.geojson")
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("path,patient,timepoint,marker,mpp,exclusions,arm\n"
                        "in/a.tif,P9,baseline,CD163,0.5,a.geojson,placebo\n")
    out = tmp_path / "out"
    r1 = score_folder(manifest=manifest, out=out, progress=False, parquet=True)
    row = r1.slides.iloc[0]
    assert (row["status"], row["patient"], row["arm"], row["mpp_source"]) == (
        "ok", "P9", "placebo", "user")
    # the excluded square (300 x 300 px = 150 µm = 0.0225 mm²) is removed from the analysis
    assert 0.005 < row["excluded_area_mm2"] <= 0.0225 + 1e-9
    assert row["analysed_area_mm2"] == pytest.approx(
        row["tissue_area_mm2"] - row["excluded_area_mm2"])
    cells = pd.read_csv(out / "cells.csv")
    inside = cells["x_px"].between(110, 390) & cells["y_px"].between(110, 390)
    assert len(cells) > 20 and not inside.any()
    for table in ("slides", "cells", "fibers"):
        pq = pd.read_parquet(out / f"{table}.parquet").replace("", np.nan)
        pd.testing.assert_frame_equal(pq, pd.read_csv(out / f"{table}.csv"), check_dtype=False)
    run = json.loads((out / "run.json").read_text())
    assert run["slides"][0]["key"]["exclusions_sha256"] == file_sha256(tmp_path / "a.geojson")
    # new settings -> scored again; same settings -> skipped; --force -> scored again
    kw = {"manifest": manifest, "out": out, "progress": False, "overlays": False,
          "overrides": ["cells.dab_threshold_1_od=0.05"]}
    r2 = score_folder(**kw)
    assert r2.n_resumed == 0
    assert r2.slides.loc[0, "cells_positive"] >= r1.slides.loc[0, "cells_positive"]
    r3 = score_folder(**kw, force=True)
    r4 = score_folder(**kw)
    assert (r3.n_resumed, r4.n_resumed) == (0, 1)
    pd.testing.assert_frame_equal(r3.slides, r4.slides)


def _parts(out: Path) -> list[Path]:
    d = out / ".parts"
    return sorted(p for p in d.glob("*.json")) if d.is_dir() else []


def _listed(out: Path) -> int:
    try:
        return len(pd.read_csv(out / "slides.csv"))
    except (OSError, pd.errors.EmptyDataError):
        return 0


@pytest.mark.slow
def test_killed_run_resumes_and_second_run_is_refused(tmp_path):
    img = tmp_path / "in"
    img.mkdir()
    src = section_rgb("CD163", 11, SMALL)
    for i in range(4):  # four different slides (flipped copies)
        write_plain_tiff(img / f"s{i}.tif", np.ascontiguousarray(np.rot90(src, i)), 0.5)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "biopsyquant.cli", "score", str(img), "--marker", "CD163",
         "--out", str(out), "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not _listed(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert _listed(out), "the run never finished a slide"
        assert proc.poll() is None, "the run finished before it could be interrupted"
        # a second run into the same folder is refused while the first one runs
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid}"):
            score_folder(img, out=out, marker="CD163", progress=False)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    finished = {p.stem for p in _parts(out)}
    assert 1 <= len(finished) < 4
    # what is on disk is complete: every table parses, finished slides are in slides.csv
    slides = pd.read_csv(out / "slides.csv")
    assert len(slides) >= 1 and (slides["status"] == "ok").all()
    assert {f"{n}__CD163" for n in slides["slide"]} <= finished
    for p in out.rglob("*.csv"):
        if not p.name.endswith(".tmp"):
            pd.read_csv(p)
    kept = {p.name: p.read_bytes() for p in (out / ".parts").glob("*.cells.csv")}
    result = score_folder(img, out=out, marker="CD163", progress=False)
    assert result.n_ok == 4 and result.n_resumed == len(finished)
    assert any("took over the lock" in n for n in result.notes)
    for name, data in kept.items():  # finished slides were not recomputed
        assert (out / ".parts" / name).read_bytes() == data
    assert not _no_temp_files(out)
    cells = pd.read_csv(out / "cells.csv")
    assert sorted(cells["slide"].unique()) == ["s0", "s1", "s2", "s3"]


@pytest.mark.slow
def test_local_cluster_equals_local_run(cohort, local_run, tmp_path):
    _, out_local = local_run
    out = tmp_path / "out_dask"
    result = score_folder([cohort], out=out, pattern=PATTERN, recursive=True,
                          overrides=OVERRIDES, tile_size=512, progress=False,
                          scheduler="local", workers=2)
    assert (result.n_ok, result.n_error) == (4, 1)
    for table in ("slides.csv", "cells.csv", "fibers.csv"):
        a = pd.read_csv(out_local / table)
        b = pd.read_csv(out / table)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9)
    run = json.loads((out / "run.json").read_text())
    assert "LocalCluster" in run["runner"]
