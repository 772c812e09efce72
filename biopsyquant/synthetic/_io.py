"""Writing synthetic sections (TIFF + truth files) and the shipped ``sample_images/``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import tifffile

from ..errors import InputError
from ._section import SyntheticSection, generate_section

__all__ = ["write_sample", "write_sample_images", "SAMPLE_DESIGN", "SAMPLE_MARKERS"]

SAMPLE_MARKERS = ("CD163", "MHC-I", "IL-1a", "IL-1b", "IL-1Ra")

# Known, directional truth for a pre/post comparison: P01 responds (CD163, MHC-I and IL-1a/b
# fall, IL-1Ra appears), P02 does not (levels stay about the same, no IL-1Ra).
SAMPLE_DESIGN: dict = {
    ("P01", "baseline"): {"CD163": {"cells_per_mm2": 260.0, "n_clusters": 1},
                          "MHC-I": {"positive_fiber_fraction": 0.6, "perifascicular_pattern": True},
                          "IL-1a": {"expression": 0.75}, "IL-1b": {"expression": 0.6},
                          "IL-1Ra": {"expression": 0.1}},
    ("P01", "month6"): {"CD163": {"cells_per_mm2": 70.0, "n_clusters": 0},
                        "MHC-I": {"positive_fiber_fraction": 0.15},
                        "IL-1a": {"expression": 0.25}, "IL-1b": {"expression": 0.2},
                        "IL-1Ra": {"expression": 0.7}},
    ("P02", "baseline"): {"CD163": {"cells_per_mm2": 150.0, "n_clusters": 0},
                          "MHC-I": {"positive_fiber_fraction": 0.4},
                          "IL-1a": {"expression": 0.5}, "IL-1b": {"expression": 0.45},
                          "IL-1Ra": {"expression": 0.1}},
    ("P02", "month6"): {"CD163": {"cells_per_mm2": 170.0, "n_clusters": 1},
                        "MHC-I": {"positive_fiber_fraction": 0.45},
                        "IL-1a": {"expression": 0.55}, "IL-1b": {"expression": 0.5},
                        "IL-1Ra": {"expression": 0.15}},
}


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return None if not math.isfinite(f) else f
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def write_sample(section: SyntheticSection, folder, name: str, *, compression: str = "jpeg",
                 jpeg_quality: int = 88) -> dict[str, Path]:
    """Write a section as a TIFF plus its truth files.

    Files: ``<name>.tif`` (RGB, tiled, JPEG or deflate, resolution tags in pixels per cm so the
    pixel size reads back as ``mpp``), ``<name>.truth.json`` (summary, params, stain model),
    ``<name>.cells.csv``, ``<name>.fibers.csv`` (fiber truth table), ``<name>.fibers.tif``
    (fiber labels, uint16/int32 deflate) and ``<name>.compartments.tif`` (uint8 codes, deflate).

    Parameters
    ----------
    section : SyntheticSection
    folder : str or Path
        Created if missing.
    name : str
        Base file name without extension.
    compression : {"jpeg", "deflate"}
    jpeg_quality : int
        Quality of the TIFF's JPEG tiles.  The truth refers to the rendered image before this
        compression (as for a scanner, the file is one more lossy step).

    Returns
    -------
    dict of str to Path
        The written files by role (``image``, ``truth``, ``cells``, ``fibers_table``,
        ``fibers``, ``compartments``).
    """
    if compression not in ("jpeg", "deflate"):
        raise InputError(f"`compression` must be 'jpeg' or 'deflate', got {compression!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    res = 10000.0 / section.mpp  # pixels per centimetre
    out = {"image": folder / f"{name}.tif"}
    kw = dict(compression="jpeg", compressionargs={"level": int(jpeg_quality)}) \
        if compression == "jpeg" else dict(compression="zlib", compressionargs={"level": 9})
    tifffile.imwrite(out["image"], section.rgb, photometric="rgb", tile=(256, 256),
                     resolution=(res, res), resolutionunit="CENTIMETER", metadata=None,
                     description=f"biopsyquant synthetic {section.marker} section; "
                                 f"truth in {name}.truth.json", **kw)
    lab = section.fibers
    lab = lab.astype(np.uint16) if lab.max() < 65535 else lab
    out["fibers"] = folder / f"{name}.fibers.tif"
    tifffile.imwrite(out["fibers"], lab, compression="zlib", compressionargs={"level": 9},
                     resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)
    out["compartments"] = folder / f"{name}.compartments.tif"
    tifffile.imwrite(out["compartments"], section.compartments, compression="zlib",
                     compressionargs={"level": 9}, resolution=(res, res),
                     resolutionunit="CENTIMETER", metadata=None)
    out["cells"] = folder / f"{name}.cells.csv"
    section.cells.to_csv(out["cells"], index=False, float_format="%.3f")
    out["fibers_table"] = folder / f"{name}.fibers.csv"
    section.fiber_truth.to_csv(out["fibers_table"], index=False, float_format="%.3f")
    out["truth"] = folder / f"{name}.truth.json"
    doc = {
        "about": "biopsyquant synthetic section: exact ground truth. OD values are log10, "
                 "relative to the glass background; pixel areas from the true DAB map with "
                 "thresholds 0.2/0.4/0.6 over tissue.",
        "image": out["image"].name,
        "tiff_compression": compression,
        "summary": section.summary,
        "params": section.params,
        "stain_model": section.stain_model.to_dict(),
        "regenerate": "biopsyquant.synthetic.generate_section(**params)",
    }
    out["truth"].write_text(json.dumps(_jsonable(doc), indent=1))
    return out


def write_sample_images(folder, *, shape=(1024, 1024), mpp: float = 0.5,
                        markers=SAMPLE_MARKERS, jpeg_quality: int = 85) -> list[Path]:
    """Generate the shipped sample images: 2 patients x 2 timepoints x markers.

    Names are ``{patient}_{timepoint}_{marker}.tif`` (e.g. ``P01_baseline_CD163.tif``), each
    with truth files next to it (see :func:`write_sample`) and a ``README.md``.  Deterministic:
    the same call writes byte-identical files.

    Returns
    -------
    list of Path
        The image files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for pi, ((patient, tp), design) in enumerate(SAMPLE_DESIGN.items()):
        for mi, marker in enumerate(markers):
            opts = dict(design.get(marker, {}))
            # one tissue per patient and timepoint (same biopsy for all its markers),
            # a different staining batch per marker slide
            seed = 101 + 10 * pi
            opts.setdefault("batch_seed", 1000 + 17 * pi + mi)
            opts.setdefault("vector_jitter_deg", 3.0)
            opts.setdefault("illumination", 0.08)
            opts.setdefault("n_holes", 1 if (pi + mi) % 3 == 0 else 0)
            sec = generate_section(marker=marker, seed=seed, shape=shape, mpp=mpp, **opts)
            name = f"{patient}_{tp}_{marker}"
            files = write_sample(sec, folder, name, compression="jpeg",
                                 jpeg_quality=jpeg_quality)
            written.append(files["image"])
    (folder / "README.md").write_text(_readme(shape, mpp, markers))
    return written


def _readme(shape, mpp, markers) -> str:
    rows = []
    keys = {"CD163": "cells_per_mm2", "MHC-I": "positive_fiber_fraction",
            "IL-1a": "expression", "IL-1b": "expression", "IL-1Ra": "expression"}
    for (patient, tp), design in SAMPLE_DESIGN.items():
        cells = [f"{design[m][keys[m]]:g}" for m in markers]
        rows.append(f"| {patient} | {tp} | " + " | ".join(cells) + " |")
    head = "| patient | timepoint | " + " | ".join(
        f"{m} ({keys[m]})" for m in markers) + " |"
    sep = "|---" * (len(markers) + 2) + "|"
    return f"""# Sample images (synthetic)

Every image here is **synthetic**: a skeletal-muscle cross-section rendered by
`biopsyquant.synthetic.generate_section` (fascicles, perimysium, polygonal fibers, endomysium,
vessels, capillaries, nuclei and marker-specific DAB, mixed with the Beer-Lambert law, per-slide
stain-vector rotation, uneven illumination, blur, noise), {shape[1]}x{shape[0]} px at {mpp} µm/px,
JPEG-compressed RGB TIFF with the pixel size in its resolution tags. No patient data.

Each `<name>.tif` comes with its exact ground truth:

- `<name>.truth.json`: slide-level truth (`summary`: fiber count, tissue area, positive cells and
  cells/mm² by compartment, % positive fibers and grades, true positive-area % and pixel H-score
  from the true DAB map with 0.2/0.4/0.6 OD thresholds, ...), the stain vectors and background
  used, and every generator option (`params`: `generate_section(**params)` re-creates it);
- `<name>.cells.csv`: every cell/nucleus (position, diameter, positive, grade, DAB OD, compartment,
  cluster, kind);
- `<name>.fibers.csv` and `<name>.fibers.tif`: fiber truth table and label image;
- `<name>.compartments.tif`: compartment codes (0 outside, 1 fiber, 2 endomysium, 3 perimysium,
  4 vessel, 5 perivascular).

Design (two patients, baseline and month 6; P01 responds, P02 does not, so a pre/post comparison
has a known direction):

{head}
{sep}
{chr(10).join(rows)}

Regenerate (deterministic, byte-identical):

```
python -c "from biopsyquant.synthetic import write_sample_images; write_sample_images('sample_images')"
```
or `python benchmarks/make_sample_images.py`.
"""
