"""``biopsyquant score``: score image files and folders into one output folder."""

from __future__ import annotations

import argparse
import sys

from .._batch_inputs import DEFAULT_PATTERN

HELP = "score slides/images (files, folders or a manifest) with a marker preset"

EPILOG = f"""\
examples:
  biopsyquant score slides/ --marker CD163 --out results/
  biopsyquant score slides/ --pattern "{DEFAULT_PATTERN}" --out results/ --workers 2
  biopsyquant score --manifest cohort.csv --out results/ --set cells.dab_threshold_1_od=0.25
  biopsyquant score /shared/slides --recursive --marker MHC-I --out /shared/out \\
      --scheduler tcp://10.0.0.5:8786

outputs (see docs/outputs.md): slides.csv, cells.csv, fibers.csv, overlays/*.png, run.json.
A re-run skips slides already scored with the same file and settings (--force redoes them).
Exit status: 0 all slides ok, 1 some slides failed (error rows), 2 bad arguments,
130 interrupted (finished slides are kept; re-run to resume).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("score", help=HELP, description=HELP.capitalize() + ".",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="image files and/or folders (folders: the image files inside)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    p.add_argument("--marker", "-m", help="marker preset for every file: CD163, MHC-I, IL-1a, "
                   "IL-1b, IL-1Ra, Ki67 (unless --pattern/--manifest give one per file)")
    p.add_argument("--pattern", help="file-name pattern giving fields per file, e.g. "
                   f'"{DEFAULT_PATTERN}" (stem without suffix)')
    p.add_argument("--manifest", metavar="CSV", help="CSV with columns path, marker, patient, "
                   "timepoint, [mpp], [exclusions]; relative paths are relative to the CSV")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    p.add_argument("--settings", metavar="FILE.toml", help="settings file overriding presets")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--mpp", type=float, metavar="UM_PER_PX",
                   help="pixel size in µm/px for files that lack it (or to override it)")
    p.add_argument("--exclusions", metavar="GEOJSON",
                   help="regions to exclude (level-0 pixel polygons) for every file")
    p.add_argument("--workers", "-j", type=int, default=1, metavar="N",
                   help="local worker processes (default 1); with --scheduler local: dask "
                   "workers")
    p.add_argument("--scheduler", metavar="ADDRESS|local",
                   help="run on dask.distributed: 'local' starts a LocalCluster, or a "
                   "scheduler address such as tcp://host:8786 (see docs/cluster.md)")
    p.add_argument("--tile-size", type=int, metavar="PX",
                   help="tile core edge in pixels for whole slides (tiling.tile_size_px)")
    p.add_argument("--force", action="store_true", help="re-score slides already done")
    p.add_argument("--parquet", action="store_true", help="also write Parquet tables")
    p.add_argument("--no-overlays", action="store_true", help="skip the QC pictures")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from ..batch import score_folder
    from ..errors import InputError

    if not args.paths and not args.manifest:
        raise InputError("give image files/folders or --manifest CSV")
    result = score_folder(
        args.paths, out=args.out, marker=args.marker, pattern=args.pattern,
        manifest=args.manifest, settings=args.settings, overrides=args.overrides or None,
        mpp=args.mpp, exclusions=args.exclusions, recursive=args.recursive,
        workers=args.workers, scheduler=args.scheduler, force=args.force, parquet=args.parquet,
        tile_size=args.tile_size, overlays=not args.no_overlays, progress=not args.quiet,
        command=["biopsyquant", *sys.argv[1:]])
    print(result.summary_text(), file=sys.stderr)
    return 0 if result.ok else 1
