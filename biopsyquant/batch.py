"""Score folders of slides: many files, one table per kind, resumable, local or on dask.

:func:`score_folder` is what ``biopsyquant score`` runs. For every input file it

1. determines the marker (``marker=``, the file-name ``pattern`` or the ``manifest``), the
   settings of that marker, and a key made of the file's SHA-256, the settings digest, the
   pixel-size override, the exclusion file and the package version;
2. skips it when ``DIR/.parts`` already holds a finished result with the same key (unless
   ``force``);
3. scores it with :func:`biopsyquant.wsi.score_slide` — in one piece when small, in tiles
   (spread over the workers) when larger than ``tiling.max_whole_image_px`` or than the
   region one tile reads (so no worker ever holds more than a tile's pixels);
4. commits the slide's rows to ``DIR/.parts`` atomically, draws its QC overlay, and rebuilds
   ``slides.csv``, ``run.json`` (and, at least every few slides, ``cells.csv`` and
   ``fibers.csv``) from the parts.

A file that cannot be read or scored becomes an ``error`` row with the reason; the other files
still run. An interrupted run keeps every finished slide; re-running the same command resumes.
Only one run may write into an output folder at a time (lock file). The table schema is in
``docs/outputs.md``.
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
import sys
import time
import traceback
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__
from ._batch_exec import make_runner, release_memory
from ._batch_inputs import SlideInput, gather_inputs
from ._batch_io import (
    OutputLock,
    file_sha256,
    list_parts,
    merge_object_tables,
    part_stem,
    remove_part,
    write_json,
    write_part,
    write_table,
)
from .errors import BiopsyQuantError, InputError, SettingsError
from .settings import Settings, load_settings

__all__ = ["score_folder", "BatchResult", "SLIDE_LEAD_COLUMNS", "score_one"]

#: first columns of slides.csv, in this order (the marker's summary columns follow)
SLIDE_LEAD_COLUMNS = ["slide", "path", "patient", "timepoint", "marker", "status", "error",
                      "mpp", "mpp_source", "tissue_area_mm2", "analysed_area_mm2",
                      "excluded_area_mm2", "n_fibers"]
OBJECT_LEAD_COLUMNS = ["slide", "marker"]


@dataclass
class BatchResult:
    """Outcome of :func:`score_folder`.

    Attributes
    ----------
    out : Path
        Output folder.
    slides : DataFrame
        The rows of ``slides.csv``.
    n_ok, n_error, n_resumed : int
        Slides scored fine (including resumed ones), failed, and skipped as already done.
    errors : list of (str, str)
        (slide, message) of every failed slide.
    skipped_files : list of dict
        Files in the input folders that were not images.
    notes : list of str
    interrupted : bool
    """

    out: Path
    slides: pd.DataFrame
    n_ok: int
    n_error: int
    n_resumed: int
    errors: list[tuple[str, str]]
    skipped_files: list[dict]
    notes: list[str]
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.n_error == 0 and not self.interrupted

    def summary_text(self) -> str:
        lines = [f"{len(self.slides)} slide(s): {self.n_ok} ok "
                 f"({self.n_resumed} already done, skipped), {self.n_error} error(s)"]
        for name, msg in self.errors:
            lines.append(f"  error: {name}: {msg}")
        if self.skipped_files:
            lines.append(f"  {len(self.skipped_files)} file(s) in the folders were not images "
                         "and were skipped (listed in run.json)")
        for n in self.notes:
            lines.append(f"  note: {n}")
        lines.append(f"results: {self.out}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# tasks (run in workers; module-level so they pickle by reference)


def _task_start(path: str, mpp: float | None, settings: Settings, exclusions, name: str,
                tile_size: int | None):
    """Open a slide; score it whole when small, else return its tile plan."""
    from .slide import open_slide
    from .wsi import measure_tile, merge_tiles, needs_tiling, prepare_slide, tile_tasks

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slide = open_slide(path, mpp=mpp)
    with slide:
        # whole only when the image fits in one tile's read region: a worker never holds
        # more pixels than a tile, whatever the inputs (memory bound of the batch)
        tiled = needs_tiling(slide.shape, settings, bound_to_tile=True, mpp=slide.mpp,
                             tile_size=tile_size)
        plan = prepare_slide(slide, settings=settings, exclusions=exclusions, name=name,
                             tile_size=tile_size, tiled=tiled)
        for w in caught:
            msg = str(w.message)
            if msg not in plan.warnings:
                plan.warnings.insert(0, msg)
        if tiled:
            release_memory()  # thumbnail, stain and tissue work done
            return "plan", plan
        (task,) = tile_tasks(plan, mpp_override=mpp)
        tile = measure_tile(task, slide=slide)
    result = merge_tiles(plan, [tile], seconds=time.perf_counter() - t0)
    del tile
    release_memory()
    return "result", result


def _task_tile(task):
    from .wsi import measure_tile

    result = measure_tile(task)
    release_memory()  # an idle worker should not hold the memory of its last tile
    return result


def _tile_work(task) -> float:
    """Rough cost of a tile task: pixels read times the tissue fraction of its crop."""
    h, w = task.tile.read_shape
    crop = task.tissue_crop
    frac = float(crop.mean()) if crop.size else 0.0
    return h * w * (0.1 + frac)


def score_one(path: str | Path, *, settings: Settings, mpp: float | None = None,
              exclusions=None, name: str | None = None, tile_size: int | None = None):
    """Score one file in this process as the batch does (whole or tiled by size)."""
    from .wsi import measure_tile, merge_tiles, tile_tasks

    t0 = time.perf_counter()
    kind, value = _task_start(str(path), mpp, settings, exclusions,
                              name or Path(path).stem, tile_size)
    if kind == "result":
        return value
    results = [measure_tile(t) for t in tile_tasks(value, mpp_override=mpp)]
    return merge_tiles(value, results, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------
# driver


@dataclass
class _SlideState:
    input: SlideInput
    stem: str
    settings: Settings | None = None
    key: dict = field(default_factory=dict)
    file: dict = field(default_factory=dict)
    status: str = "pending"          # pending | ok | error
    resumed: bool = False
    error: str = ""
    detail: str = ""
    plan: Any = None
    tiles: list = field(default_factory=list)
    n_tiles: int = 0
    started: float = 0.0


def _error_text(exc: BaseException, path: Path) -> tuple[str, str]:
    """(one-line message for the table, traceback for run.json)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, BiopsyQuantError):
        msg = str(exc)
    elif isinstance(exc, MemoryError):
        msg = f"{path}: out of memory while scoring (lower tiling.tile_size_px or --workers)"
    elif isinstance(exc, OSError):
        msg = f"{path}: cannot be read ({exc.strerror or exc})"
    else:
        msg = (f"{path}: internal error {type(exc).__name__}: {exc} (please report this with "
               "run.json)")
    return " ".join(msg.split()), tb


def _settings_for(marker: str, settings, overrides, tile_size: int | None,
                  cache: dict) -> Settings:
    if marker in cache:
        return cache[marker]
    if isinstance(settings, Settings):
        if settings.marker != marker:
            raise SettingsError(f"the given settings are for {settings.marker}, but this file "
                                f"is {marker}; give a settings file instead")
        s = settings if overrides is None else settings.replace(overrides)
    elif isinstance(settings, Mapping):
        s = settings.get(marker) or load_settings(marker, overrides=overrides)
    else:
        s = load_settings(marker, path=settings, overrides=overrides)
    if tile_size is not None:
        s = s.replace({"tiling.tile_size_px": int(tile_size)}, origin="--tile-size")
    cache[marker] = s
    return s


def _row(st: _SlideState, result=None) -> dict:
    inp = st.input
    row: dict[str, Any] = {"slide": inp.name, "path": str(inp.path.absolute()),
                           "patient": inp.fields.get("patient", ""),
                           "timepoint": inp.fields.get("timepoint", ""),
                           "marker": inp.marker or "", "status": st.status, "error": st.error}
    for k, v in inp.fields.items():
        row.setdefault(k, v)
    if result is not None:
        for k, v in result.summary.items():
            if k not in ("slide", "marker"):
                row[k] = v
        row["warnings"] = " | ".join(result.warnings)
    return row


def _objects(df: pd.DataFrame, st: _SlideState) -> pd.DataFrame:
    df = df.copy()
    df.insert(0, "marker", st.input.marker)
    df.insert(0, "slide", st.input.name)
    return df


def _integer_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Counts stay integers although error rows leave them empty (nullable Int64)."""
    for c in df.columns:
        col = df[c]
        if col.dtype.kind == "f":
            v = col.dropna()
            if len(v) and bool(((v % 1) == 0).all()) and not _FLOAT_NAME.search(str(c)):
                df[c] = col.astype("Int64")
    return df


_FLOAT_NAME = re.compile(r"(mm2|um2|_um|_od|od_|pct|h_score|per_|mpp|ratio|fraction|mean|_sd|"
                         r"distance|seconds)")


def _env() -> dict:
    import importlib

    pk = {}
    for m in ("numpy", "scipy", "skimage", "tifffile", "imagecodecs", "pandas", "numba", "cv2",
              "dask", "distributed"):
        try:
            pk[m] = getattr(importlib.import_module(m), "__version__", "?")
        except ImportError:
            pass
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": pk}


class _Driver:
    def __init__(self, out: Path, states: list[_SlideState], *, parquet: bool, overlays: bool,
                 progress: bool, run_info: dict) -> None:
        self.out = out
        self.states = states
        self.parquet = parquet
        self.overlays = overlays
        self.progress = progress
        self.run_info = run_info
        self.last_merge = 0.0
        self.merge_cost = 0.0
        self.merged_state: tuple | None = None
        self.bar_slides = None
        self.bar_tiles = None

    # -- outputs ------------------------------------------------------------------------
    def commit(self, st: _SlideState, result=None, *, tb: str = "") -> None:
        """Write one finished slide (ok or error) to the parts and refresh the tables."""
        record: dict[str, Any] = {
            "key": st.key, "status": st.status, "error": st.error, "file": st.file,
            "row": _row(st, result), "finished": _now(),
            "slide": st.input.name, "marker": st.input.marker, "path": str(st.input.path),
        }
        cells = fibers = None
        if result is not None:
            prov = dict(result.provenance)
            prov.pop("counts", None)
            record["provenance"] = prov
            record["counts"] = result.provenance.get("counts", {})
            record["warnings"] = list(result.warnings)
            record["settings_digest"] = result.settings.digest()
            cells = _objects(result.cells, st)
            fibers = _objects(result.fibers, st)
            if self.overlays:
                from ._batch_overlay import render_overlay

                try:
                    p = self.out / "overlays" / f"{st.stem}.png"
                    render_overlay(result, p,
                                   fields=st.input.fields)
                    record["overlay"] = p.relative_to(self.out).as_posix()
                    record["row"]["overlay"] = record["overlay"]
                except Exception as exc:  # noqa: BLE001 - a picture must not fail a slide
                    record.setdefault("warnings", []).append(f"overlay not drawn: {exc}")
        if tb:
            record["traceback"] = tb
        write_part(self.out, st.stem, record=record, cells=cells, fibers=fibers)
        self.refresh(final=False)

    def refresh(self, *, final: bool) -> pd.DataFrame:
        """Rebuild slides.csv and run.json (and the object tables when due) from the parts."""
        parts = list_parts(self.out)
        rows, slides_info = [], []
        stems = []
        for st in self.states:
            rec = parts.get(st.stem)
            if rec is None:
                continue
            rows.append(rec["row"])
            stems.append(st.stem)
            info = {k: rec.get(k) for k in ("slide", "marker", "path", "status", "error",
                                            "file", "key", "finished", "overlay", "warnings",
                                            "provenance", "counts", "traceback")
                    if rec.get(k) not in (None, "", [])}
            info["resumed"] = st.resumed
            slides_info.append(info)
        df = pd.DataFrame(rows)
        if len(df):
            lead = [c for c in SLIDE_LEAD_COLUMNS if c in df.columns]
            tail = [c for c in ("overlay", "warnings") if c in df.columns]
            rest = [c for c in df.columns if c not in lead and c not in tail]
            df = df[lead + rest + tail]
            df = _integer_columns(df)
        else:
            df = pd.DataFrame(columns=SLIDE_LEAD_COLUMNS)
        write_table(self.out / "slides.csv", df)
        if self.parquet:
            write_table(self.out / "slides.parquet", df, parquet=True)
        now = time.perf_counter()
        # what the object tables would hold: rewrite them only when that changed (the last
        # slide's commit and the final refresh would otherwise write them twice)
        state = tuple((stem, parts[stem].get("finished")) for stem in stems)
        if state != self.merged_state and (
                final or now - self.last_merge > 10 * self.merge_cost):
            for kind in ("cells", "fibers"):
                merge_object_tables(self.out, stems, kind, lead=OBJECT_LEAD_COLUMNS,
                                    parquet=self.parquet)
            self.merged_state = state
            self.merge_cost = time.perf_counter() - now
            self.last_merge = time.perf_counter()
        self.run_info["slides"] = slides_info
        self.run_info["counts"] = {
            "inputs": len(self.states),
            "ok": int(sum(1 for r in rows if r.get("status") == "ok")),
            "error": int(sum(1 for r in rows if r.get("status") == "error")),
            "resumed": int(sum(1 for s in self.states if s.resumed)),
            "pending": len(self.states) - len(rows)}
        self.run_info["updated"] = _now()
        write_json(self.out / "run.json", self.run_info)
        return df

    # -- progress -----------------------------------------------------------------------
    def open_bars(self, total: int, initial: int) -> None:
        if not self.progress:
            return
        from tqdm.auto import tqdm

        self.bar_slides = tqdm(total=total, initial=initial, desc="slides", unit="slide",
                               file=sys.stderr, position=0, dynamic_ncols=True)
        self.bar_tiles = tqdm(total=0, desc="tiles ", unit="tile", file=sys.stderr,
                              position=1, dynamic_ncols=True)

    def close_bars(self) -> None:
        for b in (self.bar_tiles, self.bar_slides):
            if b is not None:
                b.close()

    def tick(self, *, slide: bool = False, tiles: int = 0, add_tiles: int = 0) -> None:
        if self.bar_tiles is not None and (tiles or add_tiles):
            if add_tiles:
                self.bar_tiles.total += add_tiles
                self.bar_tiles.refresh()
            if tiles:
                self.bar_tiles.update(tiles)
        if slide and self.bar_slides is not None:
            self.bar_slides.update(1)

    # -- scheduling ---------------------------------------------------------------------
    def run(self, runner, todo: list[_SlideState], tile_size: int | None) -> None:
        from .wsi import merge_tiles, tile_tasks

        queue = deque(todo)
        futures: dict[Any, tuple[str, _SlideState]] = {}
        if self.overlays:
            _preload_overlay_modules()
        max_open = max(2, 2 * getattr(runner, "n_workers", 1))
        open_slides: set[int] = set()

        def fail(st: _SlideState, exc: BaseException) -> None:
            st.status = "error"
            st.error, tb = _error_text(exc, st.input.path)
            for f, (_k, s) in list(futures.items()):
                if s is st:
                    f.cancel()
                    del futures[f]
            open_slides.discard(id(st))
            self.commit(st, tb=tb)
            self.tick(slide=True)

        def finish(st: _SlideState, result) -> None:
            st.status = "ok"
            open_slides.discard(id(st))
            self.commit(st, result)
            self.tick(slide=True)

        while queue or futures:
            while queue and len(open_slides) < max_open:
                st = queue.popleft()
                st.started = time.perf_counter()
                inp = st.input
                f = runner.submit(_task_start, str(inp.path), inp.mpp, st.settings,
                                  str(inp.exclusions) if inp.exclusions else None, inp.name,
                                  tile_size)
                futures[f] = ("start", st)
                open_slides.add(id(st))
            done, _ = runner.wait(list(futures))
            for f in done:
                if f not in futures:
                    continue
                kind, st = futures.pop(f)
                if st.status == "error":
                    continue
                try:
                    value = f.result()
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001 - becomes an error row
                    fail(st, exc)
                    continue
                try:
                    if kind == "start":
                        what, payload = value
                        if what == "result":
                            self.tick(add_tiles=1, tiles=1)
                            finish(st, payload)
                        else:
                            st.plan = payload
                            tasks = tile_tasks(payload, mpp_override=st.input.mpp)
                            st.n_tiles = len(tasks)
                            self.tick(add_tiles=len(tasks))
                            # largest work first (tissue pixels read), so that the last
                            # tiles to finish are small ones and no worker idles long at the end
                            for t in sorted(tasks, key=_tile_work, reverse=True):
                                futures[runner.submit(_task_tile, t)] = ("tile", st)
                    else:
                        st.tiles.append(value)
                        self.tick(tiles=1)
                        if len(st.tiles) == st.n_tiles:
                            result = merge_tiles(st.plan, st.tiles,
                                                 seconds=time.perf_counter() - st.started)
                            st.plan, st.tiles = None, []
                            finish(st, result)
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001
                    fail(st, exc)


def _preload_overlay_modules() -> None:
    """Import matplotlib and OpenCV for the overlays in a background thread.

    The driver mostly waits while workers measure tiles; importing the plotting modules then
    (several seconds on a loaded machine) keeps that time off the end of the run.
    """
    import threading

    def load() -> None:
        try:
            import cv2  # noqa: F401
            import matplotlib
            from matplotlib.backends import backend_agg  # noqa: F401
            from matplotlib.figure import Figure  # noqa: F401

            matplotlib.use("Agg", force=False)
        except Exception:  # noqa: BLE001 - render_overlay imports (and reports) them again
            pass

    threading.Thread(target=load, name="biopsyquant-preload", daemon=True).start()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def score_folder(
    paths: Sequence[str | Path] | str | Path | None = None,
    *,
    out: str | Path,
    marker: str | None = None,
    pattern: str | None = None,
    manifest: str | Path | None = None,
    settings: Settings | str | Path | Mapping[str, Settings] | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    mpp: float | None = None,
    exclusions: str | Path | None = None,
    recursive: bool = False,
    workers: int = 1,
    scheduler: str | None = None,
    force: bool = False,
    parquet: bool = False,
    tile_size: int | None = None,
    overlays: bool = True,
    progress: bool = True,
    command: Sequence[str] | None = None,
) -> BatchResult:
    """Score every image of a folder (or list of files) into one output folder.

    Parameters
    ----------
    paths : path or sequence of paths, optional
        Image files and folders (folders: image files directly inside; all levels with
        ``recursive``). Optional when ``manifest`` is given.
    out : path
        Output folder (created). See ``docs/outputs.md`` for its files.
    marker : str, optional
        Marker for every file (``"CD163"``, ``"MHC-I"``, ``"IL-1b"`` ...), unless the pattern or
        the manifest gives one per file.
    pattern : str, optional
        File-name pattern such as ``"{patient}_{timepoint}_{marker}"`` (stem, no suffix).
    manifest : path, optional
        CSV with columns ``path`` (required), ``marker``, ``patient``, ``timepoint``, ``mpp``,
        ``exclusions`` (GeoJSON); relative paths are relative to the manifest.
    settings : Settings, TOML path or {marker: Settings}, optional
        Settings; default: each marker's preset.
    overrides : mapping or list of "section.key=value", optional
        Applied on top of the settings of every marker.
    mpp : float, optional
        Pixel size (µm/px) for files that lack it or to override it (source ``user``).
    exclusions : path, optional
        GeoJSON of excluded regions applied to every file without its own.
    recursive : bool
        Descend into sub-folders.
    workers : int
        Local worker processes (1 = this process), or dask workers with
        ``scheduler="local"``.
    scheduler : str, optional
        ``"local"`` (a dask LocalCluster of ``workers`` processes) or a dask scheduler address
        (``tcp://host:8786``); workers must see the input files at the same paths.
    force : bool
        Re-score slides already done with the same file and settings.
    parquet : bool
        Also write ``.parquet`` tables (needs pyarrow).
    tile_size : int, optional
        Tile core edge in pixels (``tiling.tile_size_px``).
    overlays : bool
        Draw ``overlays/<slide>.png``.
    progress : bool
        Progress bars (slides and tiles, with ETA) on stderr.
    command : sequence of str, optional
        Command line recorded in run.json.

    Returns
    -------
    BatchResult

    Raises
    ------
    OutputLockedError
        Another run is writing into ``out``.
    InputError, SettingsError
        No inputs, unreadable manifest, invalid settings (before any slide runs).
    """
    t_start = time.perf_counter()
    if isinstance(paths, str | Path):
        paths = [paths]
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    inputs, skipped, notes = gather_inputs(list(paths or []), marker=marker, pattern=pattern,
                                           manifest=manifest, recursive=recursive, mpp=mpp,
                                           exclusions=exclusions)
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = list(overrides)
    cache: dict[str, Settings] = {}
    for m in sorted({s.marker for s in inputs if s.marker}):
        _settings_for(m, settings, overrides, tile_size, cache)  # invalid settings: fail now
    if tile_size is not None and int(tile_size) < 64:
        raise InputError(f"--tile-size must be at least 64 pixels, got {tile_size}")

    out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out)
    lock.acquire()
    if lock.stale_taken is not None:
        notes.append(f"took over the lock of an earlier run that no longer exists "
                     f"(pid {lock.stale_taken.get('pid')})")
    for d in (out, out / ".parts", out / "overlays"):  # temp files of a killed run
        for tmp in d.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    runner = None
    driver: _Driver | None = None
    interrupted = False
    states: list[_SlideState] = []
    df = pd.DataFrame(columns=SLIDE_LEAD_COLUMNS)
    try:
        existing = list_parts(out)
        for inp in inputs:
            st = _SlideState(input=inp, stem=part_stem(inp.name, inp.marker or "unknown"))
            states.append(st)
            if inp.problem:
                st.status, st.error = "error", inp.problem
                continue
            st.settings = cache[inp.marker]
            try:
                stat = inp.path.stat()
                if inp.path.is_dir():
                    raise IsADirectoryError(21, "is a folder, not an image file")
                st.file = {"size_bytes": stat.st_size, "sha256": file_sha256(inp.path),
                           "mtime": _dt.datetime.fromtimestamp(
                               stat.st_mtime, _dt.UTC).isoformat(timespec="seconds")}
                ex_hash = file_sha256(inp.exclusions) if inp.exclusions else None
            except FileNotFoundError as exc:
                missing = exc.filename or inp.path
                st.status, st.error = "error", f"{missing}: file not found"
                continue
            except OSError as exc:
                st.status, st.error = "error", f"{exc.filename or inp.path}: cannot be read " \
                                                f"({exc.strerror or exc})"
                continue
            st.key = {"sha256": st.file["sha256"], "settings_digest": st.settings.digest(),
                      "mpp_override": inp.mpp, "exclusions_sha256": ex_hash,
                      "biopsyquant_version": __version__}
            old = existing.get(st.stem)
            if (not force and old and old.get("status") == "ok" and old.get("key") == st.key
                    and (out / ".parts" / f"{st.stem}.cells.csv").is_file()):
                st.status, st.resumed = "ok", True
            elif old:
                remove_part(out, st.stem)
        run_info: dict[str, Any] = {
            "biopsyquant_version": __version__,
            "command": list(command) if command else None,
            "started": _now(),
            "status": "running",
            "inputs": {"paths": [str(p) for p in (paths or [])], "manifest": str(manifest)
                       if manifest else None, "pattern": pattern, "marker": marker,
                       "recursive": recursive, "mpp_override": mpp, "force": force,
                       "exclusions": str(exclusions) if exclusions else None},
            "settings": {m: {"digest": s.digest(), "origin": list(s.origin),
                             "values": s.to_dict()} for m, s in cache.items()},
            "tiling": {m: s.to_dict().get("tiling") for m, s in cache.items()},
            "environment": _env(),
            "skipped_files": skipped,
            "notes": notes,
        }
        driver = _Driver(out, states, parquet=parquet, overlays=overlays, progress=progress,
                         run_info=run_info)
        for st in states:  # inputs that failed before scoring
            if st.status == "error":
                driver.commit(st)
        todo = [s for s in states if s.status == "pending"]
        done_before = len(states) - len(todo)
        driver.refresh(final=True)
        if todo:
            runner = make_runner(workers, scheduler)
            run_info["runner"] = runner.description
            driver.open_bars(len(states), done_before)
            try:
                driver.run(runner, todo, tile_size)
            finally:
                driver.close_bars()
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        try:
            if runner is not None:
                runner.close(cancel=interrupted)
        finally:
            try:
                if driver is not None:
                    run_info = driver.run_info
                    run_info["status"] = "interrupted" if interrupted else "complete"
                    run_info["finished"] = _now()
                    run_info["seconds"] = round(time.perf_counter() - t_start, 3)
                    df = driver.refresh(final=True)
            finally:
                lock.release()
    errors = [(r["slide"], r["error"]) for _, r in df.iterrows() if r["status"] == "error"]
    return BatchResult(out=out, slides=df, n_ok=int((df["status"] == "ok").sum()),
                       n_error=int((df["status"] == "error").sum()),
                       n_resumed=sum(1 for s in states if s.resumed), errors=errors,
                       skipped_files=skipped, notes=notes, interrupted=interrupted)
