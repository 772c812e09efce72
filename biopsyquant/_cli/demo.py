"""``biopsyquant demo``: score the bundled sample images and compare pre/post (``make demo``)."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

HELP = "score the sample images (every marker) and run the pre/post comparison"
PATTERN = "{patient}_{timepoint}_{marker}"
#: the headline number of each marker (figures are drawn for these only, to keep the demo quick)
KEY_METRICS = {"CD163": "cells_per_mm2", "MHC-I": "fibers_positive_pct",
               "IL-1a": "positive_area_pct", "IL-1b": "positive_area_pct",
               "IL-1Ra": "positive_area_pct", "Ki67": "positive_pct"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help=HELP, description=HELP.capitalize() + ".")
    p.add_argument("--out", "-o", default="demo_output", metavar="DIR",
                   help="output folder (default: demo_output)")
    p.add_argument("--images", metavar="DIR",
                   help="sample images folder (default: sample_images/ of the source tree, "
                   "generated into DIR/sample_images when absent)")
    p.add_argument("--workers", "-j", type=int, default=1, metavar="N",
                   help="local worker processes (default 1)")
    p.add_argument("--force", action="store_true", help="re-score images already scored")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return p


def _sample_folder(args: argparse.Namespace, out: Path) -> Path:
    if args.images:
        return Path(args.images)
    for cand in (Path(__file__).resolve().parents[2] / "sample_images",
                 Path.cwd() / "sample_images"):
        if cand.is_dir() and any(cand.glob("*.tif")):
            return cand
    target = out / "sample_images"
    if not any(target.glob("*.tif")):
        from ..synthetic import write_sample_images

        print(f"no sample_images/ folder found; generating the synthetic samples into {target}",
              file=sys.stderr)
        write_sample_images(target)
    return target


def sample_images(folder: Path) -> list[Path]:
    """The sample slides of ``folder``: ``{patient}_{timepoint}_{marker}.tif`` (truth files such
    as ``*.fibers.tif`` next to them are not slides)."""
    rx = re.compile(r"^[^_.]+_[^_.]+_[^.]+$")
    return sorted(p for p in folder.glob("*.tif") if rx.match(p.stem))


def run(args: argparse.Namespace) -> int:
    from ..batch import score_folder
    from ..errors import InputError

    out = Path(args.out)
    folder = _sample_folder(args, out)
    images = sample_images(folder)
    if not images:
        raise InputError(f"no sample images named {PATTERN}.tif in {folder}")
    print(f"scoring {len(images)} sample images from {folder} ...", file=sys.stderr)
    result = score_folder(images, out=out, pattern=PATTERN, workers=args.workers,
                          force=args.force, progress=not args.quiet,
                          command=["biopsyquant", *sys.argv[1:]])
    print(result.summary_text(), file=sys.stderr)
    lines = [f"per-slide results : {out / 'slides.csv'}",
             f"cells / fibers    : {out / 'cells.csv'}, {out / 'fibers.csv'}",
             f"QC pictures       : {out / 'overlays'}",
             f"provenance        : {out / 'run.json'}"]
    status = 0 if result.ok else 1
    if importlib.util.find_spec("biopsyquant.compare") is not None:
        from ..compare import compare_slides, write_report

        ok_rows = result.slides[result.slides["status"] == "ok"]
        if len(ok_rows):
            cmp_dir = out / "compare"
            comparison = compare_slides(out / "slides.csv")
            figs = [f"{m}:{KEY_METRICS[m]}" for m in sorted(set(ok_rows["marker"]))
                    if m in KEY_METRICS]
            report = write_report(comparison, cmp_dir, figure_metrics=figs or None)
            lines.append(f"pre/post report   : {report}")
    print("\n".join(lines))
    return status
