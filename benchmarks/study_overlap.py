"""Whole vs tiled at several tile overlaps: how far does each tiling move a slide's results?

Writes generated 4096² sections (0.5 µm/px) as tiled JPEG pyramids and scores each with
``score_slide(tiled=False)`` (one piece, the same slide-level stain model, tissue mask, fiber
levels and vessel wall reference as the tiled runs) and ``score_slide(tiled=True,
tile_size=2048)`` at each overlap. For every numeric summary value it reports the largest
relative deviation from the whole-slide value, and the count / area-% keys that issue #6 bounds
(counts within 1 %, area % within 0.1 points), plus the tile read size (the cost).

Run: ``python benchmarks/study_overlap.py [--overlaps 100 150 200] [--seeds 5 9]`` (about
4 min per overlap on 2 cores). Results: docs/_parts/tile-speed-performance.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import warnings
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_batch_files import section_rgb, write_pyramid_jpeg  # noqa: E402

from biopsyquant.settings import load_settings  # noqa: E402
from biopsyquant.slide import open_slide  # noqa: E402
from biopsyquant.wsi import score_slide  # noqa: E402

COUNT_KEYS = ("n_fibers", "cells_detected", "cells_positive", "cells_endomysial",
              "cells_perimysial", "cells_perivascular", "fibers_positive")


def compare(whole: dict, tiled: dict) -> dict:
    worst_key, worst = "", 0.0
    count_dev, area_dev = 0.0, 0.0
    for k, w in whole.items():
        t = tiled.get(k)
        if not isinstance(w, int | float) or isinstance(w, bool) or not isinstance(t, int | float):
            continue
        if not (math.isfinite(w) and math.isfinite(t)):
            continue
        rel = abs(t - w) / max(abs(w), 1e-9) if w else (0.0 if t == 0 else 1.0)
        if abs(w) > 1e-6 and rel > worst:
            worst_key, worst = k, rel
        if k in COUNT_KEYS and w:
            count_dev = max(count_dev, rel)
        if k.endswith("_pct") and ("area" in k or "positive" in k):
            area_dev = max(area_dev, abs(t - w))
    return {"worst_key": worst_key, "worst_rel_pct": worst * 100,
            "count_dev_pct": count_dev * 100, "area_pct_dev_pts": area_dev}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--overlaps", type=float, nargs="+", default=[100.0, 150.0, 200.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[5, 9])
    ap.add_argument("--markers", nargs="+", default=["CD163", "MHC-I", "IL-1b"])
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for marker in args.markers:
            for seed in args.seeds:
                path = write_pyramid_jpeg(Path(d) / f"{marker}_{seed}.tif",
                                          section_rgb(marker, seed, args.size), 0.5)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with open_slide(path) as slide:
                        base = load_settings(marker)
                        whole = score_slide(slide, settings=base, tiled=False).summary
                        for ov in args.overlaps:
                            st = load_settings(marker, overrides={"tiling.overlap_um": ov})
                            res = score_slide(slide, settings=st, tiled=True, tile_size=2048)
                            rows.append({"marker": marker, "seed": seed, "overlap_um": ov,
                                         "tiles": res.provenance["tiling"]["n_tiles"],
                                         "read_px": (2048 + 2 * math.ceil(ov / 0.5)) ** 2,
                                         **compare(whole, res.summary)})
                            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    print()
    print(df.round(4).to_string(index=False))
    g = df.groupby("overlap_um")[["worst_rel_pct", "count_dev_pct", "area_pct_dev_pts"]].max()
    print()
    print(g.round(4).to_string())


if __name__ == "__main__":
    main()
