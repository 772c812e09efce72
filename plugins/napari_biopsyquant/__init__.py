"""napari plugin of biopsyquant: open slides, score IHC, review and correct, export.

The plugin is a thin layer over the :mod:`biopsyquant` library: the reader calls
:func:`biopsyquant.slide.open_slide`, the widget calls :func:`biopsyquant.score.score_image`
(or the tiled whole-slide scorer) and the batch writers; no analysis code lives here.
"""

from biopsyquant import __version__

__all__ = ["__version__"]
