"""napari reader: every format :func:`biopsyquant.slide.open_slide` reads.

Pyramids are returned as multiscale layers built from the lazy levels, with ``scale`` in µm
per pixel when the pixel size is known (1 otherwise) and the slide facts in ``metadata``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from biopsyquant._batch_inputs import IMAGE_SUFFIXES
from biopsyquant.errors import BiopsyQuantError

#: the suffixes the batch scans for (kept equal to the manifest's filename_patterns)
READABLE_SUFFIXES = tuple(IMAGE_SUFFIXES)


def napari_get_reader(path: str | list[str]) -> Callable | None:
    """Return a reader for ``path`` or None when biopsyquant cannot read it."""
    if isinstance(path, list | tuple):
        if not path:
            return None
        path = path[0]
    p = str(path)
    if not p.lower().endswith(READABLE_SUFFIXES) or not Path(p).is_file():
        return None
    return read_slide


def slide_layer_data(path: str | Path, *, mpp: float | None = None) -> tuple[Any, dict, str]:
    """One napari layer tuple ``(data, kwargs, "image")`` for a slide file.

    Raises
    ------
    biopsyquant.errors.SlideError
        The file cannot be read (message names the file).
    """
    from biopsyquant.slide import open_slide

    slide = open_slide(path, mpp=mpp)
    levels = [slide.level_array(i) for i in range(len(slide.levels))]
    scale = (slide.mpp, slide.mpp) if slide.mpp else (1.0, 1.0)
    meta = {
        "biopsyquant": {
            "path": str(slide.path),
            "format": slide.format,
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "mpp_warning": getattr(slide, "mpp_warning", None),
            "levels": [tuple(lv.shape) for lv in slide.levels],
        }
    }
    kwargs = {
        "name": Path(str(path)).stem,
        "rgb": True,
        "scale": scale,
        "metadata": meta,
        "multiscale": len(levels) > 1,
    }
    if slide.mpp:
        kwargs["units"] = "um"
    data = levels if len(levels) > 1 else levels[0]
    return data, kwargs, "image"


def read_slide(path: str | list[str]) -> list[tuple[Any, dict, str]] | None:
    """Read one or several slides into napari layer tuples."""
    paths = path if isinstance(path, list | tuple) else [path]
    out = []
    for p in paths:
        try:
            out.append(slide_layer_data(p))
        except BiopsyQuantError:
            if len(paths) == 1:
                return None  # let napari try another reader / report "no reader"
            continue
    return out or None
