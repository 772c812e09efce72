"""Whole-slide throughput: decode-only vs scoring per marker, with peak memory.

Generates, in a temporary folder, one ~20,000 × 20,000 pyramidal JPEG-tiled TIFF per marker
(a mirrored mosaic of a 2048² synthetic section of that marker, written tile by tile so
memory stays bounded), then for each slide

* **decode only**: reads all of level 0 in 2048-px regions through ``Slide.read_region``
  (JPEG decoding with 2 threads), and
* **score**: ``biopsyquant score`` on the slide (``score_folder``) with ``--workers`` local
  processes, tiled with the preset tiling (2048-px cores, 200 µm overlap; tiles with the most
  tissue first, tiles without tissue skipped), then tables, QC overlay and run.json,

each in a fresh child process, sampling the resident memory of that process and all its
descendants (driver + workers) every 0.1 s. Prints one table: Mpx/s, seconds, peak RSS.

Usage::

    python benchmarks/bench_wsi.py [--size 20000] [--markers CD163 MHC-I IL-1b] [--workers 2]

Goals (2-core machine): IL-1 pixel scoring ≥ 50 % of the decode-only rate; CD163 and MHC-I
≥ 20 Mpx/s; peak RSS < 2 GB whatever the slide size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SOURCE = 2048
DEFAULT_MARKERS = ["CD163", "MHC-I", "IL-1b"]
TILE = 512
MPP = 0.5


def _mosaic_index(start: int, n: int, period: int) -> np.ndarray:
    """Indices into a period-long source for a mirrored mosaic (continuous at block seams)."""
    i = np.arange(start, start + n)
    block, within = np.divmod(i, period)
    return np.where(block % 2 == 1, period - 1 - within, within)


def write_mosaic_slide(path: Path, src: np.ndarray, size: int, *, tissue_fraction: float = 1.0,
                       glass=(236, 236, 238), mpp: float = MPP) -> None:
    """Pyramidal JPEG-tiled TIFF of ``size``² from ``src`` (levels /1, /4, /16), tile by tile.

    ``tissue_fraction`` < 1: only a central square of that share of the slide area holds the
    mosaic, the rest is glass of colour ``glass`` (a slide as scanned: mostly glass)."""
    import cv2
    import tifffile

    levels = [src]
    for f in (4, 16):
        levels.append(cv2.resize(src, (SOURCE // f, SOURCE // f), interpolation=cv2.INTER_AREA))
    side = size * float(np.sqrt(tissue_fraction))
    lo, hi = (size - side) / 2, (size + side) / 2  # level-0 tissue square [lo, hi)
    glass = np.asarray(glass, np.uint8)

    def tiles(level: int):
        s = levels[level]
        n = -(-size // (4 ** level))
        f = 4 ** level
        for y in range(0, n, TILE):
            ri = _mosaic_index(y, TILE, s.shape[0])
            rin = ((np.arange(y, y + TILE) + 0.5) * f >= lo) & ((np.arange(y, y + TILE) + 0.5) * f < hi)
            for x in range(0, n, TILE):
                ci = _mosaic_index(x, TILE, s.shape[1])
                cin = ((np.arange(x, x + TILE) + 0.5) * f >= lo) & \
                    ((np.arange(x, x + TILE) + 0.5) * f < hi)
                if not (rin.any() and cin.any()):
                    yield np.broadcast_to(glass, (TILE, TILE, 3)).copy()
                    continue
                t = np.ascontiguousarray(s[np.ix_(ri, ci)])
                if not (rin.all() and cin.all()):
                    t[~(rin[:, None] & cin[None, :])] = glass
                yield t

    r = 1e4 / mpp
    kw = {"photometric": "rgb", "tile": (TILE, TILE), "compression": "jpeg",
          "compressionargs": {"level": 90}, "dtype": np.uint8, "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(0), shape=(size, size, 3), subifds=2, resolution=(r, r),
                 resolutionunit="CENTIMETER", **kw)
        for lv in (1, 2):
            n = -(-size // (4 ** lv))
            tw.write(tiles(lv), shape=(n, n, 3), subfiletype=1, **kw)


# ------------------------------------------------------------------ child-process jobs

def job_decode(path: str) -> dict:
    from biopsyquant.slide import open_slide

    t0 = time.perf_counter()
    n = 0
    with open_slide(path) as s:
        h, w = s.shape
        for y in range(0, h, 2048):
            for x in range(0, w, 2048):
                a = s.read_region(x, y, min(2048, w - x), min(2048, h - y))
                n += a.shape[0] * a.shape[1]
    return {"seconds": time.perf_counter() - t0, "pixels": n}


def job_score(path: str, marker: str, workers: int, out: str, *overrides: str) -> dict:
    from biopsyquant.batch import score_folder

    t0 = time.perf_counter()
    r = score_folder([path], out=out, marker=marker, workers=workers, progress=False,
                     force=True, overrides=list(overrides) or None)
    sec = time.perf_counter() - t0
    run = json.loads((Path(out) / "run.json").read_text())
    prov = run["slides"][0].get("provenance", {})
    secs = prov.get("seconds", {})
    return {"seconds": sec, "status": r.slides.loc[0, "status"],
            "tile_s": secs.get("tiles_sum"), "prepare_s": secs.get("prepare"),
            "error": r.slides.loc[0, "error"], "tiles": prov.get("tiling", {}).get("n_tiles"),
            "pixels": int(np.prod(prov.get("shape", [0, 0])))}


# ------------------------------------------------------------------ memory sampling

def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (Linux /proc)."""
    return sum(_tree_rss_by_pid(root).values())


def _tree_rss_by_pid(root: int) -> dict[int, int]:
    """Resident bytes of ``root`` and of each of its descendants (Linux /proc)."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
            fields = stat[stat.rindex(")") + 2:].split()
            parent[int(d)] = int(fields[1])
            rss[int(d)] = int(fields[21]) * page
        except (OSError, ValueError, IndexError):
            continue
    out: dict[int, int] = {}
    todo = [root]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out[p] = rss.get(p, 0)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return out


#: at the last run_child's peak: resident MB of the driver and of its largest children
PEAK_SPLIT: dict[str, float] = {}


def run_child(args: list[str]) -> tuple[dict, int]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            text=True)
    peak = 0
    stop = threading.Event()
    PEAK_SPLIT.clear()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            by_pid = _tree_rss_by_pid(proc.pid)
            total = sum(by_pid.values())
            if total > peak:
                peak = total
                kids = sorted((v for p, v in by_pid.items() if p != proc.pid), reverse=True)
                PEAK_SPLIT.update(driver=by_pid.get(proc.pid, 0) / 2**20,
                                  children=[round(v / 2**20) for v in kids])
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed with status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="slide edge in pixels")
    ap.add_argument("--markers", nargs="+", default=DEFAULT_MARKERS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="folder to keep the generated slides in (default: temp)")
    ap.add_argument("--mpp", type=float, default=MPP,
                    help="pixel size of the generated slides (0.25 = a 40x scan)")
    ap.add_argument("--tissue-fraction", type=float, default=1.0,
                    help="share of the slide covered by tissue (default 1: all tissue, the "
                    "worst case; real slides are mostly glass, e.g. 0.25)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE", help="settings override for scoring, e.g. "
                    "tiling.max_whole_image_px=16000000 to tile smaller slides")
    ap.add_argument("--_job", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._job:
        kind, *rest = a._job
        res = job_decode(*rest) if kind == "decode" else job_score(rest[0], rest[1],
                                                                    int(rest[2]), *rest[3:])
        print(json.dumps(res))
        return

    from biopsyquant.synthetic import generate_section

    with tempfile.TemporaryDirectory(prefix="bench_wsi_") as tmp:
        folder = Path(a.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        mpx = a.size * a.size / 1e6
        print(f"slides: {a.size}x{a.size} ({mpx:.0f} Mpx, tissue on {100 * a.tissue_fraction:g} "
              f"% of it), JPEG q90 tiles {TILE}, "
              f"{a.mpp} µm/px, pyramid /1 /4 /16; scoring with {a.workers} worker processes "
              f"{' '.join(a.overrides)}; "
              f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", flush=True)
        rows = []
        for i, marker in enumerate(a.markers):
            tf = a.tissue_fraction
            path = folder / (f"bench_{marker}" + (f"_t{tf:g}" if tf < 1 else "")
                             + (f"_mpp{a.mpp:g}" if a.mpp != MPP else "") + ".tif")
            if not path.is_file():
                t0 = time.perf_counter()
                # seed by marker (not by position in --markers): the same slide every run
                seed = 40 + (DEFAULT_MARKERS.index(marker) if marker in DEFAULT_MARKERS else i)
                src = generate_section(marker=marker, seed=seed, shape=(SOURCE, SOURCE),
                                       mpp=a.mpp).rgb
                write_mosaic_slide(path, src, a.size, tissue_fraction=tf, mpp=a.mpp)
                del src
                print(f"  wrote {path.name} ({path.stat().st_size / 1e6:.0f} MB) in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            load0 = os.getloadavg()[0]
            dec, dec_rss = run_child(["--_job", "decode", str(path)])
            sco, sco_rss = run_child(["--_job", "score", str(path), marker, str(a.workers),
                                      str(folder / f"out_{marker}"), *a.overrides])
            split = dict(PEAK_SPLIT)
            load1 = os.getloadavg()[0]
            row = {"marker": marker, "decode_mpx_s": dec["pixels"] / 1e6 / dec["seconds"],
                   "decode_s": dec["seconds"], "decode_peak_rss_mb": dec_rss / 2**20,
                   "score_mpx_s": mpx / sco["seconds"], "score_s": sco["seconds"],
                   "tissue_fraction": tf,
                   "score_tissue_mpx_s": mpx * min(tf, 1.0) / sco["seconds"],
                   "score_peak_rss_mb": sco_rss / 2**20, "tiles": sco["tiles"],
                   "status": sco["status"], "peak_driver_mb": split.get("driver"),
                   "peak_children_mb": split.get("children"),
                   "load_before": load0, "load_after": load1,
                   "tile_s": sco.get("tile_s"), "prepare_s": sco.get("prepare_s")}
            row["score_vs_decode"] = row["score_mpx_s"] / row["decode_mpx_s"]
            rows.append(row)
            print(f"  {marker}: decode {row['decode_mpx_s']:.1f} Mpx/s ({dec['seconds']:.1f} s), "
                  f"score {row['score_mpx_s']:.2f} Mpx/s ({sco['seconds']:.0f} s, "
                  f"{sco['tiles']} tiles, {sco['status']}), peak RSS "
                  f"{row['score_peak_rss_mb']:.0f} MB (driver {split.get('driver', 0):.0f}, "
                  f"children {split.get('children')}); load average {load0:.1f} -> "
                  f"{load1:.1f}", flush=True)
        print()
        print("| marker | tissue share | decode only Mpx/s | score Mpx/s (slide px) | "
              "score Mpx/s (tissue px) | score / decode | score s | tiles | "
              "peak RSS MB (driver + workers) | at the peak: driver / children MB | "
              "load average |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            kids = " + ".join(str(k) for k in (r["peak_children_mb"] or [])[:3])
            print(f"| {r['marker']} | {100 * r['tissue_fraction']:g} % | "
                  f"{r['decode_mpx_s']:.1f} | {r['score_mpx_s']:.2f} | "
                  f"{r['score_tissue_mpx_s']:.2f} | "
                  f"{100 * r['score_vs_decode']:.1f} % | {r['score_s']:.0f} | {r['tiles']} | "
                  f"{r['score_peak_rss_mb']:.0f} | {r['peak_driver_mb'] or 0:.0f} / {kids} | "
                  f"{r['load_before']:.1f} -> {r['load_after']:.1f} |")
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
