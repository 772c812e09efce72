"""Synthetic brightfield muscle cross-sections with exact ground truth.

:func:`generate_section` renders an H-DAB (or H&E) skeletal-muscle cross-section -- fascicles,
perimysium, polygonal fibers, endomysium, vessels, capillaries, nuclei and marker-specific DAB
(CD163 macrophages, MHC class I on fibers, IL-1 family granular staining, a Ki67-like nuclear
marker) -- through Beer-Lambert mixing with per-batch stain vectors, uneven illumination, blur,
noise and optional JPEG.  The result carries the exact truth: fiber labels, compartment codes,
tissue mask, true hematoxylin/DAB concentration maps, cell and fiber tables and a summary.
:func:`write_sample` and :func:`write_sample_images` write TIFFs plus truth files.
"""

from ._io import SAMPLE_DESIGN, SAMPLE_MARKERS, write_sample, write_sample_images
from ._params import DEFAULTS, MARKERS
from ._section import COMPARTMENTS, SyntheticSection, generate_section

__all__ = [
    "DEFAULTS",
    "MARKERS",
    "COMPARTMENTS",
    "SAMPLE_DESIGN",
    "SAMPLE_MARKERS",
    "SyntheticSection",
    "generate_section",
    "write_sample",
    "write_sample_images",
]
