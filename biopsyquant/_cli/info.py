"""``biopsyquant info PATH...``: what biopsyquant sees in each slide or image.

Per file: format, pyramid levels and their shapes, native sample type and the conversion
rule to uint8 RGB, microns per pixel and where it came from (with the reason when it is
unknown), the background (glass) intensity and stain vectors estimated on a thumbnail, and the
tissue area in mm².  A file that cannot be read prints one error line naming it; the other
files are still reported and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from typing import Any

from ..errors import BiopsyQuantError, InputError

#: Longest thumbnail side (px) on which background, stains and tissue are estimated.
DEFAULT_THUMBNAIL = 1024


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``info`` sub-command."""
    p = subparsers.add_parser(
        "info",
        help="describe slides: format, levels, pixel size, background, stains, tissue area",
        description=(
            "Print, per file, the format, pyramid levels, sample type, microns per pixel and "
            "its source, and - estimated on a thumbnail - the background (glass) intensity, "
            "the stain vectors and the tissue area in mm². Bad files print an error line and "
            "make the exit code 1; the other files are still reported."
        ),
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="slide or image files")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (a list with one object per file)")
    p.add_argument("--mpp", type=float, default=None, metavar="UM",
                   help="µm per level-0 pixel for every file (overrides the files)")
    p.add_argument("--thumbnail-size", type=int, default=DEFAULT_THUMBNAIL, metavar="PX",
                   help=f"longest side of the analysis thumbnail (default {DEFAULT_THUMBNAIL})")
    p.add_argument("--stains", default="H-DAB", metavar="PRESET",
                   help="two-stain preset naming the estimated vectors: H-DAB (default) or H-E")
    p.add_argument("--no-analysis", action="store_true",
                   help="skip the background, stain and tissue estimates (header only)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="largest array biopsyquant may allocate (default 2e9 pixels)")
    return p


# ------------------------------------------------------------------------------------------


def _analyse(slide, *, thumbnail_size: int, base: str) -> dict[str, Any]:
    """Background, stain vectors and tissue area estimated on a thumbnail."""
    out: dict[str, Any] = {"analysis_notes": []}
    notes: list[str] = out["analysis_notes"]
    rgb, ds = slide.thumbnail(max_size=thumbnail_size)
    mpp_t = None if slide.mpp is None else slide.mpp * ds
    out["thumbnail"] = {"shape": list(rgb.shape[:2]), "downsample": round(ds, 4),
                        "mpp": mpp_t}
    try:
        from .. import stains as stains_mod

        estimate_background = stains_mod.estimate_background
        estimate_stains = stains_mod.estimate_stains
    except (ImportError, AttributeError):
        estimate_background = estimate_stains = None
    try:
        from .. import tissue as tissue_mod

        detect_tissue = tissue_mod.detect_tissue
        tissue_area_mm2 = tissue_mod.tissue_area_mm2
    except (ImportError, AttributeError):
        detect_tissue = tissue_area_mm2 = None

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # uneven illumination, as scoring corrects it (default settings)
            from ..illumination import fit_flat_field

            flat = fit_flat_field(rgb, mpp=mpp_t or 0.5 * ds, shape=tuple(slide.shape[:2]))
            rgb = flat.apply(rgb, scale=(slide.shape[0] / rgb.shape[0],
                                         slide.shape[1] / rgb.shape[1]))
            out["illumination"] = {"corrected": flat.applied, "reason": flat.reason,
                                   "max_correction_pct": round(flat.max_correction_pct(), 2)}
        except (ImportError, BiopsyQuantError) as exc:
            out["illumination"] = None
            notes.append(f"illumination: n/a ({exc})")
        background = None
        if estimate_background is not None:
            background = tuple(float(v) for v in estimate_background(rgb))
            out["background"] = [round(v, 2) for v in background]
        else:
            out["background"] = None
            notes.append("background: n/a (stain module not available)")

        mask = None
        if detect_tissue is not None:
            if mpp_t is None:
                notes.append("tissue: n/a (pixel size unknown; pass --mpp)")
                out["tissue_area_mm2"] = None
            else:
                mask = detect_tissue(rgb, mpp=mpp_t, background=background)
                out["tissue_area_mm2"] = float(tissue_area_mm2(mask, mpp_t))
                out["tissue_fraction"] = round(float(mask.mean()), 4)
        else:
            out["tissue_area_mm2"] = None
            notes.append("tissue: n/a (tissue module not available)")

        if estimate_stains is not None:
            model = estimate_stains(rgb, base=base, tissue_mask=mask, background=background)
            out["stains"] = {
                "names": list(model.names[:2]),
                "vectors": [[round(float(v), 4) for v in row] for row in model.vectors[:2]],
                "source": model.source,
            }
        else:
            out["stains"] = None
            notes.append("stains: n/a (stain module not available)")
    for w in caught:
        notes.append(str(w.message))
    return out


def _describe(path: str, args: argparse.Namespace) -> dict[str, Any]:
    from ..slide import DEFAULT_MAX_PIXELS, PixelSizeWarning, open_slide

    with warnings.catch_warnings():
        # the mpp warning is part of the report (mpp_warning), not a stray stderr line
        warnings.simplefilter("ignore", PixelSizeWarning)
        slide = open_slide(path, mpp=args.mpp,
                           max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    with slide:
        d = slide.info_dict()
        if not args.no_analysis:
            try:
                d.update(_analyse(slide, thumbnail_size=args.thumbnail_size, base=args.stains))
            except BiopsyQuantError as exc:
                d["analysis_error"] = str(exc)
    return d


def _fmt_levels(levels: list[dict]) -> list[str]:
    lines = []
    for lv in levels:
        h, w = lv["shape"]
        tile = f"  tiles {lv['tile_shape'][1]}x{lv['tile_shape'][0]}" if lv["tile_shape"] else ""
        lines.append(f"    {lv['index']}: {w} x {h} px  (downsample {lv['downsample']:g}){tile}")
    return lines


def _fmt_text(d: dict) -> str:
    h, w = d["shape"]
    lines = [d["path"]]
    lines.append(f"  format        {d['format']}")
    lines.append(f"  size          {w} x {h} px (width x height), {len(d['levels'])} level(s)")
    lines += _fmt_levels(d["levels"])
    lines.append(f"  samples       {d['dtype']}, {d['samples_per_pixel']} per pixel; "
                 f"to uint8 RGB: {d['conversion']}")
    if d["mpp"] is not None:
        lines.append(f"  mpp           {d['mpp']:.4g} µm/px (source: {d['mpp_source']})")
    else:
        lines.append(f"  mpp           unknown (source: {d['mpp_source']})")
    if d.get("mpp_warning"):
        lines.append(f"  mpp warning   {d['mpp_warning']}")
    if d.get("objective_power"):
        lines.append(f"  objective     {d['objective_power']:g}x")
    assoc = d.get("metadata", {}).get("associated_images")
    if assoc:
        lines.append(f"  other images  {', '.join(map(str, assoc))} (not analysed)")
    for n in d.get("notes", []):
        lines.append(f"  note          {n}")
    if "analysis_error" in d:
        lines.append(f"  analysis      failed: {d['analysis_error']}")
    elif "thumbnail" in d:
        th, tw = d["thumbnail"]["shape"]
        lines.append(f"  thumbnail     {tw} x {th} px (downsample {d['thumbnail']['downsample']:g}),"
                     " used for the estimates below")
        bg = d.get("background")
        il = d.get("illumination")
        if il:
            lines.append(f"  illumination  {il['reason']}")
        lines.append("  background    " + (
            f"R {bg[0]:.1f}  G {bg[1]:.1f}  B {bg[2]:.1f} (0-255)" if bg else "n/a"))
        st = d.get("stains")
        if st:
            vecs = "; ".join(
                f"{n} ({', '.join(f'{v:.3f}' for v in vec)})"
                for n, vec in zip(st["names"], st["vectors"], strict=True)
            )
            lines.append(f"  stains        {vecs}  [{st['source']}]")
        else:
            lines.append("  stains        n/a")
        area = d.get("tissue_area_mm2")
        if area is not None and math.isfinite(area):
            frac = d.get("tissue_fraction")
            extra = f" ({100 * frac:.1f}% of the image)" if frac is not None else ""
            lines.append(f"  tissue        {area:.3f} mm²{extra}")
        else:
            lines.append("  tissue        n/a")
        for n in d.get("analysis_notes", []):
            lines.append(f"  note          {n}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Describe every path; exit code 1 when any file failed."""
    if args.mpp is not None and (not math.isfinite(args.mpp) or args.mpp <= 0):
        raise InputError(f"--mpp must be a positive number of µm per pixel, got {args.mpp!r}")
    if args.thumbnail_size < 16:
        raise InputError(f"--thumbnail-size must be at least 16 pixels, got {args.thumbnail_size}")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise InputError(f"--max-pixels must be positive, got {args.max_pixels}")
    if args.stains not in ("H-DAB", "H-E"):
        raise InputError(f"--stains must be H-DAB or H-E, got {args.stains!r}")
    # tifffile logs recoverable header oddities; the report states what matters
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    results: list[dict] = []
    failed = 0
    for i, path in enumerate(args.paths):
        try:
            d = _describe(path, args)
        except BiopsyQuantError as exc:
            failed += 1
            d = {"path": str(path), "error": str(exc)}
            if not args.json:
                print(f"biopsyquant: error: {exc}", file=sys.stderr)
        results.append(d)
        if not args.json and "error" not in d:
            if i:
                print()
            print(_fmt_text(d))
            sys.stdout.flush()
    if args.json:
        print(json.dumps(_finite(results), indent=2, ensure_ascii=False, allow_nan=False,
                         default=_json_default))
    return 1 if failed else 0


def _finite(o: Any) -> Any:
    """Replace NaN/inf by None (JSON has no NaN) throughout nested lists/dicts."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)
