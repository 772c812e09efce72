"""Sample data (File ▸ Open Sample): the synthetic sections shipped in ``sample_images/``.

``sample_images/`` holds slide images named ``{patient}_{timepoint}_{marker}.tif`` next to
their truth files (``*.fibers.tif``, ``*.compartments.tif``, ``*.cells.csv`` ...); only the
slide images are offered. When the package is installed without the repository's
``sample_images/`` folder, the same kind of section is generated on the fly with
:mod:`biopsyquant.synthetic` (deterministic, seed 0).
"""

from __future__ import annotations

import re
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample_images"
#: a slide image (not a truth file): exactly three underscore-separated fields, one suffix
_SLIDE_NAME = re.compile(r"^(?P<patient>[^_.]+)_(?P<timepoint>[^_.]+)_(?P<marker>[^_.]+)\.tiff?$",
                         re.IGNORECASE)


def sample_files(marker: str | None = None, folder: Path = SAMPLE_DIR) -> list[Path]:
    """Slide images of ``folder`` (optionally of one marker), sorted; truth files excluded."""
    from biopsyquant.errors import SettingsError
    from biopsyquant.settings import canonical_marker

    if not folder.is_dir():
        return []
    want = canonical_marker(marker) if marker else None
    out = []
    for p in sorted(folder.iterdir()):
        m = _SLIDE_NAME.match(p.name)
        if not m or not p.is_file():
            continue
        try:
            mk = canonical_marker(m.group("marker"))
        except SettingsError:
            continue
        if want is None or mk == want:
            out.append(p)
    return out


def _sample(marker: str):
    from ._reader import slide_layer_data

    files = sample_files(marker)
    if files:
        return [slide_layer_data(files[0])]
    from biopsyquant.synthetic import generate_section

    sec = generate_section(marker=marker, seed=0, shape=(1024, 1024), mpp=0.5)
    meta = {"biopsyquant": {"path": None, "format": "synthetic", "mpp": sec.mpp,
                            "mpp_source": "user", "levels": [sec.rgb.shape[:2]]}}
    return [(sec.rgb, {"name": f"synthetic_{marker}", "rgb": True, "scale": (sec.mpp, sec.mpp),
                       "units": "um", "metadata": meta}, "image")]


def sample_cd163():
    """CD163 macrophages on a synthetic muscle section."""
    return _sample("CD163")


def sample_mhc():
    """MHC class I on a synthetic muscle section."""
    return _sample("MHC-I")


def sample_il1a():
    """IL-1α on a synthetic muscle section."""
    return _sample("IL-1a")


def sample_il1b():
    """IL-1β on a synthetic muscle section."""
    return _sample("IL-1b")


def sample_il1ra():
    """IL-1Ra on a synthetic muscle section."""
    return _sample("IL-1Ra")
