"""Options of the synthetic section generator: defaults per marker and validation."""

from __future__ import annotations

import numpy as np

from ..errors import InputError

MARKERS = ("CD163", "MHC-I", "IL-1a", "IL-1b", "IL-1Ra", "Ki67", "none", "HE")

# Every option, its default (None = marker-dependent, resolved below) and meaning.
DEFAULTS: dict = {
    # staining batch / imaging (everything rendered from `batch_seed`)
    "batch_seed": None,            # default: = seed
    "stain_vectors": None,         # None -> preset (H-DAB or H-E); else (2,3) or (3,3) OD vectors
    "vector_jitter_deg": 0.0,      # rotate each stain vector by this angle (random axis)
    "background": None,            # glass intensity (R,G,B); None -> random slightly off-white
    "illumination": 0.06,          # relative strength of vignetting + gradient (0 = flat)
    "blur_um": 0.4,                # Gaussian optical blur sigma, µm
    "noise": 1.5,                  # camera noise std (grey levels at the background)
    "jpeg_quality": None,          # e.g. 85 -> JPEG round trip of the RGB
    "counterstain": 1.0,           # hematoxylin strength factor
    "dab_strength": 1.0,           # global factor on all specific DAB (batch variation)
    "background_dab": 0.04,        # non-specific DAB OD over tissue (mean)
    # tissue architecture
    "tissue_coverage": 0.85,       # fraction of the image covered by tissue (1 = all)
    "n_holes": 0,                  # tears / holes (glass) in the perimysium
    "fascicle_diameter_um": 550.0,
    "perimysium_width_um": 22.0,
    "epimysium_width_um": 12.0,    # connective rim at the tissue edge
    "fiber_diameter_um": (35.0, 75.0),
    "atrophic_fraction": 0.05,
    "atrophic_diameter_um": (10.0, 30.0),
    "perifascicular_atrophy": False,
    "endomysium_width_um": (1.0, 4.0),
    "corner_rounding_um": 4.5,
    "boundary_wobble_um": 0.6,
    "central_nuclei_fraction": 0.03,
    "myonuclei_per_100um": 1.6,    # peripheral myonuclei per 100 µm of fiber perimeter
    "interstitial_nuclei_per_mm2": 500.0,
    "vessels_per_mm2": 8.0,
    "vessel_diameter_um": (20.0, 80.0),
    "capillaries_per_fiber": 1.2,
    "capillary_diameter_um": (5.0, 8.0),
    "perivascular_width_um": 20.0,
    "min_fiber_area_um2": 40.0,
    # cells (macrophages / inflammatory cells)
    "cells_per_mm2": None,         # CD163: 100; MHC-I: 15; IL-1*: 40; others 0
    "n_clusters": 0,
    "cluster_size": (10, 25),
    "cell_diameter_um": (8.0, 20.0),
    "compartment_weights": {"endomysium": 0.5, "perimysium": 0.3, "perivascular": 0.2},
    "cell_grade_weights": (0.3, 0.4, 0.3),   # 1+, 2+, 3+ among positive cells
    "negative_cell_fraction": 0.0,           # macrophage-shaped cells with DAB < 0.2
    # MHC class I
    "positive_fiber_fraction": None,         # MHC-I: 0.3; others 0
    "perifascicular_pattern": False,
    "fiber_grade_weights": (0.4, 0.35, 0.25),
    "sarcoplasmic_fraction": 0.5,            # positive fibers with interior staining too
    "truth_rim_width_um": 3.0,               # band inside the border where rim_od is measured
    # IL-1 family
    "expression": 0.5,
    # Ki67-like nuclear marker
    "positive_nucleus_fraction": 0.25,
}


def _pair(name, v, lo=0.0):
    try:
        a, b = (float(x) for x in v)
    except (TypeError, ValueError):
        raise InputError(f"option `{name}` must be a (min, max) pair, got {v!r}") from None
    if not (np.isfinite(a) and np.isfinite(b)) or a < lo or b < a:
        raise InputError(f"option `{name}` must be a pair min <= max >= {lo}, got {v!r}")
    return (a, b)


def resolve(marker: str, seed: int, shape, mpp: float, options: dict) -> dict:
    """Validate the options and return the full parameter dict (every option explicit)."""
    if marker not in MARKERS:
        raise InputError(f"unknown marker {marker!r}; choose one of {list(MARKERS)}")
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise InputError(f"unknown option(s) {unknown} for generate_section; "
                         f"valid options are {sorted(DEFAULTS)}")
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        raise InputError(f"`mpp` must be a number (µm per pixel), got {mpp!r}") from None
    if not (0.05 <= mpp <= 4.0):
        raise InputError(f"`mpp` must be between 0.05 and 4 µm per pixel, got {mpp}")
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"`shape` must be (height, width), got {shape!r}") from None
    if h < 64 or w < 64 or h > 65536 or w > 65536:
        raise InputError(f"`shape` must be between 64 and 65536 px per side, got {shape!r}")
    if not isinstance(seed, (int, np.integer)):
        raise InputError(f"`seed` must be an integer, got {seed!r}")
    p = dict(DEFAULTS)
    p.update(options)
    p["marker"] = marker
    p["seed"] = int(seed)
    p["shape"] = (h, w)
    p["mpp"] = mpp
    if p["batch_seed"] is None:
        p["batch_seed"] = int(seed)
    if p["cells_per_mm2"] is None:
        p["cells_per_mm2"] = {"CD163": 100.0, "MHC-I": 15.0, "IL-1a": 40.0, "IL-1b": 40.0,
                              "IL-1Ra": 40.0}.get(marker, 0.0)
    if p["positive_fiber_fraction"] is None:
        p["positive_fiber_fraction"] = 0.3 if marker == "MHC-I" else 0.0
    for k in ("fiber_diameter_um", "atrophic_diameter_um", "endomysium_width_um",
              "vessel_diameter_um", "capillary_diameter_um", "cell_diameter_um"):
        p[k] = _pair(k, p[k], lo=0.1)
    p["cluster_size"] = tuple(int(x) for x in _pair("cluster_size", p["cluster_size"], lo=1))
    checks = {
        "cells_per_mm2": (0, 5000), "positive_fiber_fraction": (0, 1), "expression": (0, 1),
        "atrophic_fraction": (0, 1), "central_nuclei_fraction": (0, 1),
        "tissue_coverage": (0.05, 1), "vector_jitter_deg": (0, 45), "illumination": (0, 0.5),
        "blur_um": (0, 10), "noise": (0, 50), "background_dab": (0, 0.5),
        "counterstain": (0, 5), "dab_strength": (0, 5), "perimysium_width_um": (2, 500),
        "fascicle_diameter_um": (50, 1e5), "vessels_per_mm2": (0, 200),
        "capillaries_per_fiber": (0, 10), "perivascular_width_um": (0, 500),
        "negative_cell_fraction": (0, 1), "sarcoplasmic_fraction": (0, 1),
        "positive_nucleus_fraction": (0, 1), "interstitial_nuclei_per_mm2": (0, 1e5),
        "myonuclei_per_100um": (0, 50), "n_holes": (0, 100), "n_clusters": (0, 1000),
        "corner_rounding_um": (0.05, 50), "boundary_wobble_um": (0, 10),
        "epimysium_width_um": (0, 500), "truth_rim_width_um": (0.1, 50),
        "min_fiber_area_um2": (0, 1e5),
    }
    for k, (lo, hi) in checks.items():
        try:
            v = float(p[k])
        except (TypeError, ValueError):
            raise InputError(f"option `{k}` must be a number, got {p[k]!r}") from None
        if not (lo <= v <= hi):
            raise InputError(f"option `{k}` must be between {lo} and {hi}, got {p[k]!r}")
    if p["jpeg_quality"] is not None and not (1 <= int(p["jpeg_quality"]) <= 100):
        raise InputError(f"option `jpeg_quality` must be 1-100 or None, got {p['jpeg_quality']!r}")
    for k in ("cell_grade_weights", "fiber_grade_weights"):
        wts = np.asarray(p[k], float)
        if wts.shape != (3,) or (wts < 0).any() or wts.sum() <= 0:
            raise InputError(f"option `{k}` must be 3 non-negative weights, got {p[k]!r}")
        p[k] = tuple(float(x) for x in wts / wts.sum())
    cw = p["compartment_weights"]
    if not isinstance(cw, dict) or not set(cw) <= {"endomysium", "perimysium", "perivascular"} \
            or sum(float(v) for v in cw.values()) <= 0 or min(float(v) for v in cw.values()) < 0:
        raise InputError("option `compartment_weights` must map endomysium/perimysium/"
                         f"perivascular to non-negative weights, got {cw!r}")
    p["compartment_weights"] = {k: float(v) for k, v in cw.items()}
    fib_px = p["fiber_diameter_um"][1] / mpp
    if p["fiber_diameter_um"][0] / mpp < 4:
        raise InputError(f"fibers of {p['fiber_diameter_um'][0]} µm would be under 4 px wide at "
                         f"mpp={mpp}; use a smaller mpp")
    if fib_px * 0 + h * w > 40000 ** 2:
        raise InputError(f"`shape` {shape} is too large for an in-memory synthetic section")
    if p["stain_vectors"] is not None:
        v = np.asarray(p["stain_vectors"], float)
        if v.shape not in ((2, 3), (3, 3)):
            raise InputError(f"option `stain_vectors` must have shape (2, 3) or (3, 3), got {v.shape}")
        p["stain_vectors"] = [[float(x) for x in r] for r in v]
    if p["background"] is not None:
        bg = tuple(float(x) for x in p["background"])
        if len(bg) != 3 or min(bg) < 50 or max(bg) > 255:
            raise InputError(f"option `background` must be 3 intensities 50-255, got {p['background']!r}")
        p["background"] = bg
    return p
