"""biopsyquant: quantify IHC on skeletal-muscle biopsy slides.

The public API is re-exported here (imported lazily so that ``import biopsyquant`` stays cheap):

- :func:`open_slide` — read any supported slide (:mod:`biopsyquant.slide`)
- :func:`score_image` / :class:`ScoreResult` — score one image (:mod:`biopsyquant.score`)
- :func:`load_settings` / :class:`Settings` — marker presets and overrides
- :func:`score_folder` — batch scoring (:mod:`biopsyquant.batch`)
- :func:`compare_slides` — pre/post comparison (:mod:`biopsyquant.compare`)
- :class:`StainModel`, :func:`deconvolve`, :func:`estimate_stains` — stain separation
- :func:`generate_section` — synthetic sections with exact truth
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "open_slide": "biopsyquant.slide",
    "Slide": "biopsyquant.slide",
    "score_image": "biopsyquant.score",
    "ScoreResult": "biopsyquant.score",
    "load_settings": "biopsyquant.settings",
    "Settings": "biopsyquant.settings",
    "score_folder": "biopsyquant.batch",
    "compare_slides": "biopsyquant.compare",
    "StainModel": "biopsyquant.stains",
    "deconvolve": "biopsyquant.stains",
    "estimate_stains": "biopsyquant.stains",
    "generate_section": "biopsyquant.synthetic",
    "BiopsyQuantError": "biopsyquant.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'biopsyquant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
