"""Scoring through a real dask.distributed cluster: a scheduler and two workers started as
separate processes on 127.0.0.1 (as docs/cluster.md describes), torn down afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_batch_files import section_rgb, write_plain_tiff, write_pyramid_jpeg

from biopsyquant.cli import main

DASK = str(Path(sys.executable).with_name("dask"))
OVERRIDES = ["--set", "tiling.max_whole_image_px=300000", "--tile-size", "320"]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process we started and everything it started (its own session)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    else:  # the leader is gone; make sure no child of its group survives
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def cluster(tmp_path):
    if not Path(DASK).is_file():
        pytest.skip("the dask command-line tool is not installed")
    sched_file = tmp_path / "scheduler.json"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], name: str) -> None:
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=tmp_path))

    try:
        start([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
               "--scheduler-file", str(sched_file)], "scheduler")
        deadline = time.monotonic() + 90
        while not sched_file.is_file() and time.monotonic() < deadline:
            assert procs[0].poll() is None, (logs / "scheduler.log").read_text()
            time.sleep(0.2)
        assert sched_file.is_file(), "scheduler did not start within 90 s"
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            start([DASK, "worker", address, "--host", "127.0.0.1", "--nworkers", "1",
                   "--nthreads", "1", "--no-dashboard", "--name", f"w{i}",
                   "--memory-limit", "3GB"], f"worker{i}")
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            _stop(p)


@pytest.mark.slow
def test_scheduler_and_two_worker_processes(cluster, tmp_path):
    img = tmp_path / "slides"
    img.mkdir()
    write_plain_tiff(img / "A_pre_CD163.tif", section_rgb("CD163", 21, 512), 0.5)
    write_pyramid_jpeg(img / "A_post_IL-1b.tif", section_rgb("IL-1b", 22, 640), 0.5, levels=2)
    (img / "B_pre_CD163.tif").write_bytes(b"not an image at all")
    common = [str(img), "--pattern", "{patient}_{timepoint}_{marker}", "-q", *OVERRIDES]
    out_d, out_l = tmp_path / "out_dask", tmp_path / "out_local"
    assert main(["score", *common, "--out", str(out_d), "--scheduler", cluster]) == 1
    assert main(["score", *common, "--out", str(out_l)]) == 1
    run = json.loads((out_d / "run.json").read_text())
    assert run["runner"] == f"dask scheduler {cluster}"
    tiled = [s for s in run["slides"] if s["slide"] == "A_post_IL-1b"][0]
    assert tiled["provenance"]["tiling"]["n_tiles"] == 4
    slides = pd.read_csv(out_d / "slides.csv")
    assert slides.set_index("slide")["status"].to_dict() == {
        "A_post_IL-1b": "ok", "A_pre_CD163": "ok", "B_pre_CD163": "error"}
    for table in ("slides.csv", "cells.csv", "fibers.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out_d / table), pd.read_csv(out_l / table),
                                      check_exact=False, rtol=1e-9)


def test_unreachable_scheduler_is_a_clear_error(tmp_path, capsys):
    img = tmp_path / "x.tif"
    write_plain_tiff(img, section_rgb("CD163", 21, 512), 0.5)
    code = main(["score", str(img), "--marker", "CD163", "--out", str(tmp_path / "o"), "-q",
                 "--scheduler", "tcp://127.0.0.1:9"])
    assert code == 2
    assert "cannot reach the dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err
