"""Sample data (File ▸ Open Sample): the synthetic sections shipped in ``sample_images/``.

When the package is installed without the repository's ``sample_images/`` folder, the same
kind of section is generated on the fly with :mod:`biopsyquant.synthetic` (deterministic).
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample_images"


def _sample(marker: str):
    from ._reader import slide_layer_data

    files = sorted(SAMPLE_DIR.glob(f"*_{marker}.tif")) if SAMPLE_DIR.is_dir() else []
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


def sample_il1b():
    """IL-1β on a synthetic muscle section."""
    return _sample("IL-1b")


def sample_il1ra():
    """IL-1Ra on a synthetic muscle section."""
    return _sample("IL-1Ra")
