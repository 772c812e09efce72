"""Open whole-slide images and camera images as lazily read, uint8 RGB pyramids.

This is the only module of biopsyquant that talks to :mod:`tifffile` (and to OpenSlide, which is
an optional extra).  Everything downstream receives ``uint8`` arrays of shape ``(h, w, 3)``.

Formats
-------
* ``tiff`` / ``bigtiff``: plain or tiled (Big)TIFF, any compression :mod:`imagecodecs` decodes
  (JPEG, deflate, LZW, JPEG 2000, zstd, ...), pyramids as SubIFDs or as reduced-resolution pages;
* ``ome-tiff``: OME-TIFF, pyramids via SubIFDs, pixel size from ``PhysicalSizeX/Y`` (+ units);
* ``svs``: Aperio SVS, pixel size from ``MPP = ...`` in the ImageDescription; the label, macro
  and thumbnail images are *not* levels;
* ``ndpi``: Hamamatsu NDPI (pixel size from X/YResolution in centimetres);
* ``scn``, ``bif``, ``philips-tiff``: other TIFF-based scanner formats tifffile recognises;
* ``png``, ``jpeg``: camera images (decoded whole with imagecodecs; one level);
* ``openslide``: MRXS, CZI, VMS, ... through OpenSlide when ``openslide-python`` and
  ``openslide-bin`` are installed (``pip install 'biopsyquant[openslide]'``).

Pixel size (``mpp``, µm per pixel at level 0) and its source
------------------------------------------------------------
``user`` (the ``mpp=`` argument, always wins) > ``svs`` (``MPP =``) > ``ome``
(``PhysicalSizeX/Y`` converted from their units) > ``tiff-resolution`` (X/YResolution with
ResolutionUnit: inch -> 25400/res, centimetre -> 10000/res) > ``openslide``
(``openslide.mpp-x/y``) > ``unknown``.  A file value of 72, 96 or 300 dpi (screen and printer
defaults) or any value outside 0.05-5 µm/px is not believed: ``mpp`` becomes ``None``, the source
``unknown``, and a :class:`PixelSizeWarning` is issued and kept in ``Slide.mpp_warning``.  When X
and Y differ, ``mpp`` is their geometric mean (it keeps the pixel area exact) and a warning says
so.  A user value outside 0.05-5 µm/px is used but warned about.

Pixel conversion rules (native samples -> uint8 RGB)
----------------------------------------------------
* uint8: unchanged.  bool (bilevel): 0 -> 0, 1 -> 255.
* uint16: right-shifted by ``bits - 8`` where ``bits`` is 16 unless the TIFF declares a smaller
  ``MaxSampleValue`` (e.g. 4095 -> 12 bits -> ``>> 4``); so by default **16-bit -> 8-bit is
  ``>> 8``**.  The rule is fixed per file (never data dependent), so tiles of one slide always
  convert identically.  A 12-bit camera image without ``MaxSampleValue`` therefore comes out dark.
* float16/32/64: values in [0, 1] are multiplied by 255 and rounded; any value outside [0, 1]
  (or NaN) is refused with :class:`~biopsyquant.errors.SlideError`.
* grayscale (one sample): replicated to R = G = B; ``MinIsWhite`` photometric is inverted first.
* gray + alpha, RGBA, RGB + extra samples: alpha/extra samples dropped (no compositing).
* palette (colour map): expanded through the map (16-bit maps scaled by ``>> 8``).
* YCbCr stored without JPEG compression: converted to RGB (ITU-R BT.601, full range); JPEG
  decoders already return RGB.
* planar configuration ``separate`` (``SYX``) and OME channel-planar RGB (``CYX``, C = 3) are
  moved to ``YXS``.  Files with several planes (Z, T, pages of a stack) read the first plane and
  say so in ``Slide.notes``.
* anything else (signed or 32-bit integers, CMYK, complex, ...): refused with ``SlideError``.

Regions reaching outside a level are clipped and the outside is filled with white (255), which
every downstream step treats as glass.  Nothing larger than ``max_pixels`` is ever allocated:
whole-image formats (PNG/JPEG) declaring more pixels, and TIFF strips/tiles larger than that, are
refused when the file is opened, from the header alone; ``read_region``/``read_level`` requests
larger than the limit are refused before reading.  Every failure (missing, empty, not an image,
truncated, corrupt, unsupported) raises :class:`~biopsyquant.errors.SlideError` naming the file
and the problem.
"""

from __future__ import annotations

import abc
import math
import os
import struct
import threading
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BiopsyQuantError, InputError, SlideError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MPP_RANGE",
    "SUSPECT_DPI",
    "Level",
    "LevelArray",
    "PixelSizeWarning",
    "Slide",
    "open_slide",
]

#: Default limit on the number of pixels materialised in one array (about 6 GB of RGB).
DEFAULT_MAX_PIXELS = 2_000_000_000
#: Plausible microscope pixel sizes, µm per pixel (10x ~ 1, 40x ~ 0.25).
MPP_RANGE = (0.05, 5.0)
#: Screen/printer defaults written by non-microscopy software: never a real pixel size.
SUSPECT_DPI = (72.0, 96.0, 300.0)
#: Declared level-0 sizes beyond this are treated as corrupt headers (about 1 m^2 at 1 µm/px).
MAX_DECLARED_PIXELS = 1 << 40

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
#: TIFF compressions whose decoders return stored samples as they are (no colour transform)
_RAW_CODECS = frozenset({1, 5, 8, 32773, 32946, 34925, 50000})
_NOT_LEVEL_NAMES = ("label", "macro", "thumbnail", "overview", "map")
_OPENSLIDE_HINT = (
    "reading MRXS, CZI, VMS and other non-TIFF slide formats needs the optional OpenSlide extra: "
    "pip install 'biopsyquant[openslide]' (openslide-python + openslide-bin)"
)


class PixelSizeWarning(UserWarning):
    """The file's pixel size is missing, implausible or anisotropic."""


@dataclass(frozen=True)
class Level:
    """One resolution level of a slide.

    Attributes
    ----------
    index : int
        0 is full resolution.
    shape : tuple of int
        ``(height, width)`` in this level's pixels.
    downsample : float
        Level-0 pixels per pixel of this level (mean of the height and width ratios).
    tile_shape : tuple of int or None
        ``(height, width)`` of one stored tile/strip, ``None`` for whole-image formats.
    """

    index: int
    shape: tuple[int, int]
    downsample: float
    tile_shape: tuple[int, int] | None = None

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]


# --------------------------------------------------------------------------------------------
# error handling helpers


@contextmanager
def _reading(path: str | Path, what: str) -> Iterator[None]:
    """Turn any library exception into a SlideError naming the file and the step."""
    try:
        yield
    except BiopsyQuantError:
        raise
    except MemoryError:
        raise SlideError(path, f"{what}: not enough memory") from None
    except Exception as exc:  # noqa: BLE001 - every decoder error must become a SlideError
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
        raise SlideError(path, f"{what} ({detail})") from exc


# --------------------------------------------------------------------------------------------
# pixel conversion


@dataclass(frozen=True)
class _PixelFormat:
    """How native samples of shape (h, w, c) become uint8 RGB."""

    dtype: np.dtype
    colour: str  # "gray", "gray-inverted", "rgb", "ycbcr", "palette", "rgba-openslide"
    shift: int = 0  # uint16 right shift
    lut: np.ndarray | None = None  # palette, (n, 3) uint8

    def describe(self) -> str:
        parts = []
        kind = self.dtype.kind
        if self.dtype == np.uint16:
            parts.append(f"uint16 -> uint8 by >> {self.shift}")
        elif kind == "f":
            parts.append(f"{self.dtype.name} in [0, 1] -> uint8 by x255")
        elif kind == "b":
            parts.append("bilevel -> 0/255")
        if self.colour == "gray":
            parts.append("grayscale replicated to RGB")
        elif self.colour == "gray-inverted":
            parts.append("MinIsWhite grayscale inverted and replicated to RGB")
        elif self.colour == "palette":
            parts.append("palette expanded to RGB")
        elif self.colour == "rgba-openslide":
            parts.append("transparent pixels filled white, alpha dropped")
        elif self.colour == "ycbcr":
            parts.append("YCbCr converted to RGB (ITU-R BT.601)")
        return "; ".join(parts) if parts else "none (uint8 RGB)"

    def convert(self, a: np.ndarray, path: str) -> np.ndarray:
        """Convert native ``(h, w, c)`` samples to uint8 ``(h, w, 3)``."""
        if self.lut is not None:
            idx = a[..., 0]
            if idx.dtype.kind not in "ui":
                idx = idx.astype(np.intp)
            idx = np.minimum(idx, self.lut.shape[0] - 1)
            return self.lut[idx]
        kind = a.dtype.kind
        if a.dtype == np.uint8:
            b = a
        elif kind == "b":
            b = a.view(np.uint8) * np.uint8(255)
        elif a.dtype == np.uint16:
            b = a >> self.shift if self.shift else a
            if self.shift < 8:
                b = np.minimum(b, 255)
            b = b.astype(np.uint8)
        elif kind == "f":
            if a.size:
                lo, hi = float(np.min(a)), float(np.max(a))
                if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
                    raise SlideError(
                        path,
                        f"floating-point samples outside [0, 1] (found {lo:g} .. {hi:g}); "
                        "only float images scaled to [0, 1] are converted (x255) - save the "
                        "image as 8-bit RGB",
                    )
            b = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
        else:  # pragma: no cover - refused at open
            raise SlideError(path, f"unsupported sample type {a.dtype}")
        if self.colour in ("gray", "gray-inverted"):
            g = b[..., 0]
            if self.colour == "gray-inverted":
                g = 255 - g
            return np.repeat(g[..., None], 3, axis=2)
        if self.colour == "ycbcr":  # TIFF 6.0 / ITU-R BT.601 full range
            f = b[..., :3].astype(np.float32)
            y, cb, cr = f[..., 0], f[..., 1] - 128.0, f[..., 2] - 128.0
            rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb],
                           axis=-1)
            return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        if self.colour == "rgba-openslide":
            rgb = np.array(b[..., :3])
            if b.shape[-1] > 3:
                rgb[b[..., 3] == 0] = 255
            return rgb
        return b[..., :3]


def _lut_from_colormap(colormap: np.ndarray) -> np.ndarray:
    cmap = np.asarray(colormap)
    if cmap.ndim != 2 or cmap.shape[0] != 3:
        raise ValueError(f"palette colour map has shape {cmap.shape}, expected (3, n)")
    if cmap.max(initial=0) > 255:
        cmap = cmap >> 8
    return np.ascontiguousarray(cmap.T.astype(np.uint8))


def _check_dtype(path: str, dtype: np.dtype) -> None:
    if dtype == np.uint8 or dtype == np.uint16 or dtype.kind in "bf":
        return
    raise SlideError(
        path,
        f"unsupported sample type {dtype} (biopsyquant reads 8- or 16-bit unsigned, bilevel or "
        "[0, 1] float images); convert the image to 8-bit RGB",
    )


# --------------------------------------------------------------------------------------------
# backends: each reads native samples (h, w, c) for a clipped, in-bounds box of one level


class _Backend(abc.ABC):
    format: str
    dtype: np.dtype
    samples: int
    pixfmt: _PixelFormat
    shapes: list[tuple[int, int]]
    tile_shapes: list[tuple[int, int] | None]
    metadata: dict
    notes: list[str]
    mpp_candidates: list[tuple[str, float | None, float | None, str | None]]
    objective_power: float | None = None

    @abc.abstractmethod
    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Native samples (h, w, c) of the in-bounds box [y0:y1, x0:x1] of ``level``."""

    def read_whole(self, level: int) -> np.ndarray:
        h, w = self.shapes[level]
        return self.read(level, 0, h, 0, w)

    def lazy(self, level: int) -> Any:
        return None

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold no handle
        return None


# ---- TIFF ----------------------------------------------------------------------------------


def _resolution_mpp(page: Any) -> tuple[float | None, float | None, str | None]:
    """(mpp_x, mpp_y, problem) from X/YResolution + ResolutionUnit of a tifffile page."""
    import tifffile

    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None, None, "the file has no X/YResolution tags"
    try:
        rx, ry = page.get_resolution()
    except Exception:  # noqa: BLE001
        return None, None, "the X/YResolution tags are unreadable"
    unit = page.resolutionunit
    if not (np.isfinite(rx) and np.isfinite(ry)) or rx <= 0 or ry <= 0:
        return None, None, f"X/YResolution is {rx:g}/{ry:g}"
    if unit == tifffile.RESUNIT.INCH:
        for dpi in SUSPECT_DPI:
            if abs(rx - dpi) < 0.01 or abs(ry - dpi) < 0.01:
                return None, None, (
                    f"the file says {rx:g} dpi, a screen/printer default written by "
                    "non-microscopy software, not a microscope pixel size"
                )
        return 25400.0 / rx, 25400.0 / ry, None
    if unit == tifffile.RESUNIT.CENTIMETER:
        for dpi in SUSPECT_DPI:
            if abs(rx * 2.54 - dpi) < 0.02:
                return None, None, (
                    f"the file says {rx:g} px/cm = {rx * 2.54:g} dpi, a screen/printer default "
                    "written by non-microscopy software, not a microscope pixel size"
                )
        return 10000.0 / rx, 10000.0 / ry, None
    if int(unit) == 4:  # RESUNIT.MILLIMETER (non-standard)
        return 1000.0 / rx, 1000.0 / ry, None
    if int(unit) == 5:  # RESUNIT.MICROMETER (non-standard)
        return 1.0 / rx, 1.0 / ry, None
    return None, None, "ResolutionUnit is NONE (no physical unit)"


_OME_UNIT_UM = {
    "pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0,
    "mm": 1e3, "cm": 1e4, "dm": 1e5, "m": 1e6,
}


def _ome_mpp(xml: str, image_index: int) -> tuple[float | None, float | None, str | None, dict]:
    root = ET.fromstring(xml)
    images = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Image"]
    if not images:
        return None, None, "the OME-XML has no Image", {}
    image = images[image_index] if image_index < len(images) else images[0]
    pixels = next((el for el in image if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, None, "the OME-XML Image has no Pixels element", {}
    meta = {k: v for k, v in pixels.attrib.items() if k.startswith("PhysicalSize")}
    sx, sy = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY")
    if sx is None:
        return None, None, "the OME-XML has no PhysicalSizeX", meta
    ux = pixels.get("PhysicalSizeXUnit", "µm")
    uy = pixels.get("PhysicalSizeYUnit", ux)
    if ux not in _OME_UNIT_UM or uy not in _OME_UNIT_UM:
        return None, None, f"OME PhysicalSize unit {ux!r} is not a length unit biopsyquant knows", meta
    mx = float(sx) * _OME_UNIT_UM[ux]
    my = float(sy) * _OME_UNIT_UM[uy] if sy is not None else mx
    return mx, my, None, meta


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (bytes, bytearray)):
        return None
    if isinstance(v, (tuple, list)) and len(v) <= 16:
        return [_jsonable(x) for x in v]
    s = str(v)
    return s if len(s) <= 200 else s[:200] + "..."


class _TiffBackend(_Backend):
    def __init__(self, path: str, *, max_pixels: int, maxworkers: int) -> None:
        import tifffile

        self.path = path
        self.maxworkers = maxworkers
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        self._zarr: dict[int, Any] = {}
        self._executor: Any = None
        self._tile_pages: dict[int, Any] = {}
        self._stores: list[Any] = []
        with _reading(path, "not a readable TIFF file"):
            self.tif = tifffile.TiffFile(path)
            self.tif.filehandle.set_lock(True)  # reads may come from several threads
        try:
            with _reading(path, "cannot interpret the TIFF file"):
                self._init(max_pixels)
        except BaseException:
            self.close()
            raise

    # -- set-up ---------------------------------------------------------------------------
    def _init(self, max_pixels: int) -> None:
        import tifffile

        tif, path = self.tif, self.path
        with _reading(path, "cannot parse the TIFF structure"):
            series_list = list(tif.series)
            flags = tif.flags
        if not series_list:
            raise SlideError(path, "the TIFF file contains no image")
        if tif.is_svs or "svs" in flags:
            self.format = "svs"
        elif "ndpi" in flags:
            self.format = "ndpi"
        elif "ome" in flags:
            self.format = "ome-tiff"
        elif "scn" in flags:
            self.format = "scn"
        elif "bif" in flags:
            self.format = "bif"
        elif "philips" in flags:
            self.format = "philips-tiff"
        else:
            self.format = "bigtiff" if tif.is_bigtiff else "tiff"

        # main series: the largest one that is not a label/macro/thumbnail
        def is_aux(s: Any) -> bool:
            name = (s.name or "").lower()
            return any(n in name for n in _NOT_LEVEL_NAMES)

        def area(s: Any) -> int:
            try:
                shp = dict(zip(s.get_axes(False), s.get_shape(False), strict=True))
                return int(shp.get("Y", 0)) * int(shp.get("X", 0))
            except Exception:  # noqa: BLE001
                return 0

        candidates = [(i, s) for i, s in enumerate(series_list) if not is_aux(s)]
        if not candidates:
            candidates = list(enumerate(series_list))
        self.series_index, series = max(candidates, key=lambda t: (area(t[1]), -t[0]))
        if area(series) == 0:
            raise SlideError(path, "the TIFF image has no Y/X dimensions")
        self.series = series
        self.levels_series = list(series.levels)
        key = series.keyframe
        self.notes = []
        self.metadata = {"tiff_series": series.name or "", "tiff_series_kind": series.kind}
        if tif.is_bigtiff:
            self.metadata["bigtiff"] = True
        others = [s.name or f"series {i}" for i, s in enumerate(series_list)
                  if i != self.series_index]
        if others:
            # label/macro/thumbnail images: listed, never levels (labels may carry patient data)
            self.metadata["associated_images"] = others

        # geometry of every level (unsqueezed axes so 1-pixel levels keep their Y/X)
        axes = series.get_axes(False)
        self.axes = axes
        self.shapes, self.tile_shapes = [], []
        for lv in self.levels_series:
            shp = dict(zip(lv.get_axes(False), lv.get_shape(False), strict=True))
            h, w = int(shp["Y"]), int(shp["X"])
            if h <= 0 or w <= 0:
                raise SlideError(path, f"level {len(self.shapes)} has an empty shape {h}x{w}")
            self.shapes.append((h, w))
            kf = lv.keyframe
            if not isinstance(kf.compression, tifffile.COMPRESSION):
                raise SlideError(
                    path,
                    f"uses TIFF compression scheme {int(kf.compression)}, which tifffile and "
                    "imagecodecs cannot decode (unknown or proprietary codec)",
                )
            chunks = tuple(int(c) for c in kf.chunks)
            if kf.is_tiled:
                th, tw = int(kf.tilelength), int(kf.tilewidth)
            else:
                th, tw = min(int(kf.rowsperstrip or h), h), w
            self.tile_shapes.append((th, tw))
            if self.format != "ndpi":
                planes = int(kf.samplesperpixel) if int(kf.planarconfig) == 2 else 1
                expected = -(-h // th) * -(-w // tw) * planes * max(int(kf.imagedepth), 1)
                if int(kf.is_tiled) == 0 and int(kf.imagedepth) > 1:
                    expected = len(kf.dataoffsets)
                if len(kf.dataoffsets) < expected:
                    raise SlideError(
                        path,
                        f"level {len(self.shapes) - 1} declares {w}x{h} pixels in "
                        f"{expected:,} {'tiles' if kf.is_tiled else 'strips'} but the file "
                        f"lists only {len(kf.dataoffsets):,} (corrupt or truncated header)",
                    )
            if math.prod(chunks) > max_pixels * 4 or th * tw > max_pixels:
                raise SlideError(
                    path,
                    f"level {len(self.shapes) - 1} is stored in {th}x{tw}-pixel "
                    f"{'tiles' if kf.is_tiled else 'strips'}, more than max_pixels="
                    f"{max_pixels:,} to decode at once (re-save it tiled, or raise max_pixels)",
                )
        h0, w0 = self.shapes[0]
        if h0 * w0 > MAX_DECLARED_PIXELS:
            raise SlideError(
                path, f"declares an implausible {w0}x{h0}-pixel image (corrupt header?)"
            )

        # layout: which axis holds the colour samples, which planes we take
        sizes = dict(zip(axes, series.get_shape(False), strict=True))
        photometric = int(key.photometric)
        self.colour_axis: str | None = None
        if sizes.get("S", 1) > 1:
            self.colour_axis = "S"
        elif sizes.get("C", 1) > 1 and photometric != 3:
            if sizes["C"] in (2, 3, 4):
                self.colour_axis = "C"
        for ax, n in sizes.items():
            if ax in ("Y", "X") or ax == self.colour_axis or n <= 1:
                continue
            self.notes.append(
                f"the image has {n} planes along axis {ax!r}; biopsyquant reads the first"
            )
        self.samples = sizes.get(self.colour_axis, 1) if self.colour_axis else 1

        # pixel format
        dtype = np.dtype(series.dtype)
        _check_dtype(path, dtype)
        self.dtype = dtype
        shift = 0
        if dtype == np.uint16:
            bits = 16
            maxval = key.tags.valueof("MaxSampleValue")
            if maxval is not None:
                m = int(np.max(maxval))
                if 255 < m < 65535:
                    bits = max(8, int(m).bit_length())
            shift = bits - 8
        lut = None
        if photometric == tifffile.PHOTOMETRIC.PALETTE:
            if key.colormap is None:
                raise SlideError(path, "palette image without a colour map")
            lut = _lut_from_colormap(key.colormap)
            colour = "palette"
        elif photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE):
            if self.samples >= 3 and photometric == tifffile.PHOTOMETRIC.MINISBLACK:
                colour = "rgb"  # e.g. OME-TIFF brightfield stored as 3 channels
            else:
                colour = (
                    "gray-inverted" if photometric == tifffile.PHOTOMETRIC.MINISWHITE else "gray"
                )
        elif photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR):
            if self.samples < 3:
                raise SlideError(path, f"RGB image with {self.samples} sample(s) per pixel")
            colour = "rgb"
            if photometric == tifffile.PHOTOMETRIC.YCBCR and int(key.compression) in _RAW_CODECS:
                # JPEG decoders return RGB; raw codecs return the stored Y, Cb, Cr samples
                if tuple(key.subsampling or (1, 1)) != (1, 1):
                    raise SlideError(path, "chroma-subsampled YCbCr without JPEG compression "
                                     "is not supported; re-save the image as RGB")
                if dtype != np.uint8:
                    raise SlideError(path, f"YCbCr with {dtype} samples is not supported")
                colour = "ycbcr"
        else:
            name = getattr(tifffile.PHOTOMETRIC(photometric), "name", str(photometric))
            raise SlideError(
                path,
                f"unsupported colour space (photometric {name}); biopsyquant reads RGB, "
                "grayscale and palette images",
            )
        self.pixfmt = _PixelFormat(dtype=dtype, colour=colour, shift=shift, lut=lut)

        # metadata and pixel-size candidates, strongest first
        self.mpp_candidates = []
        page0 = self.levels_series[0].keyframe
        if self.format == "svs":
            meta = _svs_metadata(page0.description or tif.pages.first.description)
            self.metadata.update(meta)
            if "AppMag" in meta:
                self.objective_power = _float_or_none(meta["AppMag"])
            mpp = _float_or_none(meta.get("MPP"))
            if mpp is not None:
                self.mpp_candidates.append(("svs", mpp, mpp, None))
            else:
                self.mpp_candidates.append(("svs", None, None, "the SVS description has no MPP"))
        if self.format == "ome-tiff" and tif.ome_metadata:
            try:
                mx, my, problem, meta = _ome_mpp(tif.ome_metadata, self.series_index)
            except Exception as exc:  # noqa: BLE001
                mx = my = None
                problem, meta = f"the OME-XML is unreadable ({exc})", {}
            self.metadata.update(meta)
            self.mpp_candidates.append(("ome", mx, my, problem))
        if self.format == "ndpi":
            try:
                ndpi = page0.ndpi_tags or {}
            except Exception:  # noqa: BLE001
                ndpi = {}
            for k, v in ndpi.items():
                if k not in ("McuStarts", "McuStartsHighBytes"):
                    self.metadata[f"ndpi_{k}"] = _jsonable(v)
            mag = ndpi.get("Magnification")
            if mag is not None and float(mag) > 0:
                self.objective_power = float(mag)
        mx, my, problem = _resolution_mpp(page0)
        self.mpp_candidates.append(("tiff-resolution", mx, my, problem))
        for name in ("Software", "DateTime", "Make", "Model"):
            v = page0.tags.valueof(name)
            if v:
                self.metadata[name] = _jsonable(v)
        self.metadata["compression"] = getattr(page0.compression, "name", str(page0.compression))
        self.metadata["photometric"] = getattr(
            tifffile.PHOTOMETRIC(photometric), "name", str(photometric)
        )

    # -- reading --------------------------------------------------------------------------
    def _index(self, level_axes: str, y: slice, x: slice) -> tuple:
        return tuple(
            y if ax == "Y" else x if ax == "X" else slice(None) if ax == self.colour_axis else 0
            for ax in level_axes
        )

    def _to_yxc(self, a: np.ndarray, level_axes: str) -> np.ndarray:
        kept = [ax for ax in level_axes if ax in ("Y", "X") or ax == self.colour_axis]
        order = [kept.index("Y"), kept.index("X")]
        if self.colour_axis:
            order.append(kept.index(self.colour_axis))
        a = np.transpose(a, order)
        if a.ndim == 2:
            a = a[..., None]
        return a

    def _zarr_level(self, level: int) -> Any:
        with self._lock:
            z = self._zarr.get(level)
            if z is None:
                import zarr

                store = self.series.aszarr(level=level, squeeze=False, maxworkers=self.maxworkers)
                self._stores.append(store)
                z = zarr.open(store, mode="r")
                self._zarr[level] = z
            return z

    def lazy(self, level: int) -> Any:
        return self._zarr_level(level)

    def _tile_page(self, level: int) -> Any:
        """The level's single contiguous tiled page when tiles can be decoded directly."""
        with self._lock:
            if level in self._tile_pages:
                return self._tile_pages[level]
            page = self._find_tile_page(level)
            if page is not None:
                page.init_decode()  # tifffile: build the decoder once, before threads use it
            self._tile_pages[level] = page
            return page

    def _find_tile_page(self, level: int) -> Any:
        import tifffile

        lv = self.levels_series[level]
        if self.format == "ndpi" or self.series.transform is not None or len(lv.pages) != 1:
            return None
        page = lv.pages[0]
        if not isinstance(page, tifffile.TiffPage) or not page.is_tiled:
            return None
        if int(page.planarconfig) != 1 or int(page.imagedepth) != 1 or int(page.tiledepth) != 1:
            return None
        return page

    def _pool(self) -> Any:
        with self._lock:
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(self.maxworkers,
                                                    thread_name_prefix="biopsyquant-tiles")
            return self._executor

    def read_tiles(self, page: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Decode only the tiles under the box (threads when several), native (h, w, s)."""
        th, tw = int(page.tilelength), int(page.tilewidth)
        H, W = int(page.imagelength), int(page.imagewidth)
        spp = int(page.samplesperpixel)
        ntx = -(-W // tw)
        idx = [ty * ntx + tx
               for ty in range(y0 // th, (y1 - 1) // th + 1)
               for tx in range(x0 // tw, (x1 - 1) // tw + 1)]
        offsets, counts = page.dataoffsets, page.databytecounts
        if max(idx) >= len(offsets):
            raise SlideError(self.path, "the tile table is shorter than the image (corrupt file)")
        out = np.empty((y1 - y0, x1 - x0, spp), page.dtype)
        decodeargs: dict[str, Any] = {"_fullsize": True}
        if int(page.compression) in (6, 7, 34892, 33007):  # JPEG flavours need their tables
            decodeargs["jpegtables"] = page.jpegtables
            decodeargs["jpegheader"] = page.jpegheader
        decode = page.decode
        fh = page.parent.filehandle
        segments = list(fh.read_segments([offsets[i] for i in idx], [counts[i] for i in idx],
                                         idx, sort=True))

        def place(segment: tuple[bytes | None, int]) -> None:
            data, i = segment
            if counts[i] and (data is None or len(data) < counts[i]):
                raise SlideError(
                    self.path,
                    f"tile {i} of a {W}x{H} level is cut short ({0 if data is None else len(data)}"
                    f" of {counts[i]} bytes): the file is truncated",
                )
            ty, tx = divmod(i, ntx)
            ya, yb = max(y0, ty * th), min(y1, ty * th + th, H)
            xa, xb = max(x0, tx * tw), min(x1, tx * tw + tw, W)
            dst = out[ya - y0 : yb - y0, xa - x0 : xb - x0]
            tile = decode(data, i, **decodeargs)[0] if data else None
            if tile is None:
                dst[...] = page.nodata
                return
            tile = np.asarray(tile).reshape(th, tw, spp)
            dst[...] = tile[ya - ty * th : yb - ty * th, xa - tx * tw : xb - tx * tw]

        if len(segments) > 1 and self.maxworkers > 1:
            list(self._pool().map(place, segments))
        else:
            for seg in segments:
                place(seg)
        return out

    def read_zarr(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read through tifffile's zarr store (any layout tifffile supports)."""
        axes = self.levels_series[level].get_axes(False)
        z = self._zarr_level(level)
        a = np.asarray(z[self._index(axes, slice(y0, y1), slice(x0, x1))])
        return self._to_yxc(a, axes)

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        page = self._tile_page(level)
        if page is not None:
            # decode only the touched tiles, in a thread pool (about 2x the zarr store's speed
            # for 512x512 regions; no whole-page buffer for whole levels)
            return self.read_tiles(page, y0, y1, x0, x1)
        lv = self.levels_series[level]
        h, w = self.shapes[level]
        if (y1 - y0) * (x1 - x0) * 2 >= h * w and len(lv.pages) == 1:
            # strips / other layouts, at least half the page: tifffile decodes the whole page
            # with several threads, then we crop
            axes = lv.get_axes(False)
            a = lv.asarray(maxworkers=self.maxworkers).reshape(lv.get_shape(False))
            return self._to_yxc(a[self._index(axes, slice(y0, y1), slice(x0, x1))], axes)
        return self.read_zarr(level, y0, y1, x0, x1)

    def close(self) -> None:
        for s in self._stores:
            try:
                s.close()
            except Exception:  # noqa: BLE001, S110
                pass
        self._stores.clear()
        self._zarr.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        tif = getattr(self, "tif", None)
        if tif is not None:
            tif.close()


def _float_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _svs_metadata(description: str) -> dict:
    """Key/value pairs of an Aperio ImageDescription (``header|Key = value|...``)."""
    meta: dict[str, Any] = {}
    parts = (description or "").split("|")
    if parts:
        meta["Header"] = parts[0].strip()[:300]
    for item in parts[1:]:
        if "=" not in item:
            continue
        k, v = (s.strip() for s in item.split("=", 1))
        if not k:
            continue
        try:
            num = float(v)
            meta[k] = int(num) if num.is_integer() and "." not in v else num
        except ValueError:
            meta[k] = v
    return meta


# ---- PNG / JPEG ----------------------------------------------------------------------------


def _png_header(data: bytes) -> tuple[int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ValueError("the PNG header (IHDR) is missing or truncated")
    w, h = struct.unpack(">II", data[16:24])
    return h, w


def _jpeg_header(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise ValueError(f"invalid JPEG marker at byte {i}")
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in (0x01, *range(0xD0, 0xD8)):
            continue
        if i + 2 > n:
            break
        (length,) = struct.unpack(">H", data[i : i + 2])
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 7 > n:
                break
            h, w = struct.unpack(">HH", data[i + 3 : i + 7])
            return h, w
        if marker == 0xDA:
            raise ValueError("JPEG has no frame header before the scan")
        i += length
    raise ValueError("the JPEG header is truncated (no frame header found)")


class _ImageBackend(_Backend):
    """PNG / JPEG camera images: one level, decoded whole on first use."""

    def __init__(self, path: str, kind: str, *, max_pixels: int) -> None:
        self.path = path
        self.format = kind
        self.notes = []
        self.metadata = {}
        self.mpp_candidates = [(kind, None, None, f"{kind.upper()} files carry no reliable pixel size")]
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()
        data = Path(path).read_bytes()
        with _reading(path, f"not a readable {kind.upper()} file"):
            h, w = _png_header(data) if kind == "png" else _jpeg_header(data)
        if h <= 0 or w <= 0:
            raise SlideError(path, f"the {kind.upper()} header declares an empty {w}x{h} image")
        if h * w > max_pixels:
            raise SlideError(
                path,
                f"declares {w}x{h} = {h * w:,} pixels, more than max_pixels={max_pixels:,}; "
                "this format is decoded whole (raise max_pixels if the image is genuine)",
            )
        self.shapes = [(h, w)]
        self.tile_shapes = [None]
        self._data: bytes | None = data
        # sample type: PNG bit depth from IHDR; JPEG is decoded to 8 bits
        if kind == "png":
            bitdepth, colortype = data[24], data[25]
            self.dtype = np.dtype(np.uint16 if bitdepth == 16 else np.uint8)
            self.samples = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colortype, 3)
        else:
            self.dtype = np.dtype(np.uint8)
            self.samples = 3
        colour = "rgb" if self.samples >= 3 else "gray"
        self.pixfmt = _PixelFormat(dtype=self.dtype, colour=colour, shift=8 if self.dtype == np.uint16 else 0)

    def _decoded(self) -> np.ndarray:
        with self._lock:
            if self._array is None:
                import imagecodecs

                assert self._data is not None
                with _reading(self.path, f"cannot decode the {self.format.upper()} image"):
                    if self.format == "png":
                        a = imagecodecs.png_decode(self._data)
                    else:
                        a = imagecodecs.jpeg_decode(self._data)
                a = np.asarray(a)
                if a.ndim == 2:
                    a = a[..., None]
                if self.format == "jpeg" and a.shape[2] == 4:
                    raise SlideError(self.path, "CMYK JPEG is not supported; save it as RGB")
                if a.shape[:2] != self.shapes[0]:
                    raise SlideError(
                        self.path,
                        f"decoded size {a.shape[1]}x{a.shape[0]} differs from the header's "
                        f"{self.shapes[0][1]}x{self.shapes[0][0]}",
                    )
                if a.dtype != self.dtype or a.shape[2] != self.samples:
                    self.dtype = a.dtype
                    self.samples = a.shape[2]
                    _check_dtype(self.path, a.dtype)
                    self.pixfmt = _PixelFormat(
                        dtype=a.dtype,
                        colour="rgb" if a.shape[2] >= 3 else "gray",
                        shift=8 if a.dtype == np.uint16 else 0,
                    )
                self._array = a
                self._data = None
            return self._array

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._decoded()[y0:y1, x0:x1]

    def lazy(self, level: int) -> Any:
        return self._decoded()

    def close(self) -> None:
        self._array = None
        self._data = None


# ---- OpenSlide (optional) ------------------------------------------------------------------


class _OpenSlideBackend(_Backend):
    def __init__(self, path: str, openslide: Any) -> None:
        self.path = path
        self.format = "openslide"
        self.notes = []
        with _reading(path, "OpenSlide cannot open the file"):
            self.osr = openslide.OpenSlide(path)
            props = dict(self.osr.properties)
            dims = list(self.osr.level_dimensions)
            self.downsamples = [float(d) for d in self.osr.level_downsamples]
        self.shapes = [(int(h), int(w)) for (w, h) in dims]
        self.tile_shapes = [None] * len(dims)
        self.dtype = np.dtype(np.uint8)
        self.samples = 4
        self.pixfmt = _PixelFormat(dtype=self.dtype, colour="rgba-openslide")
        vendor = props.get("openslide.vendor")
        self.metadata = {"openslide_vendor": vendor} if vendor else {}
        for k, v in props.items():
            if k.startswith("openslide.") and not k.startswith("openslide.level["):
                self.metadata[k] = v
        self.objective_power = _float_or_none(props.get("openslide.objective-power"))
        mx = _float_or_none(props.get("openslide.mpp-x"))
        my = _float_or_none(props.get("openslide.mpp-y"))
        self.mpp_candidates = [
            ("openslide", mx, my if my is not None else mx,
             None if mx is not None else "OpenSlide reports no openslide.mpp-x")
        ]

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        ds = self.downsamples[level]
        img = self.osr.read_region(
            (int(round(x0 * ds)), int(round(y0 * ds))), level, (x1 - x0, y1 - y0)
        )
        return np.asarray(img)

    def close(self) -> None:
        self.osr.close()


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean of ``f x f`` blocks of a uint8 ``(h, w, 3)`` image, rounded; ragged edge blocks
    average the pixels they have.  Output ``(ceil(h / f), ceil(w / f), 3)``."""
    import cv2

    h, w, c = a.shape
    hb, wb = h // f, w // f
    hf, wf = hb * f, wb * f
    out = np.empty((-(-h // f), -(-w // f), c), np.uint8)
    if hb and wb:
        # INTER_AREA with an integer factor is exactly the block mean
        out[:hb, :wb] = cv2.resize(np.ascontiguousarray(a[:hf, :wf]), (wb, hb),
                                   interpolation=cv2.INTER_AREA).reshape(hb, wb, c)
    if wf < w and hb:
        out[:hb, wb] = np.rint(a[:hf, wf:].reshape(hb, f, w - wf, c).mean(axis=(1, 2)))
    if hf < h and wb:
        out[hb, :wb] = np.rint(a[hf:, :wf].reshape(h - hf, wb, f, c).mean(axis=(0, 2)))
    if hf < h and wf < w:
        out[hb, wb] = np.rint(a[hf:, wf:].reshape(-1, c).mean(axis=0))
    return out


# --------------------------------------------------------------------------------------------
# lazy level view


class LevelArray:
    """Lazy uint8 RGB view of one level: ``shape == (h, w, 3)``, ``dtype == uint8``.

    Indexing with slices (``a[y0:y1, x0:x1]``, steps allowed) or integers decodes only the
    tiles the selection touches and returns a numpy array.  Works as a napari multiscale level
    or with ``dask.array.from_array``.  The raw tifffile zarr array (native dtype and axes) is
    ``.native`` (``None`` for non-TIFF formats).
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, slide: Slide, level: int) -> None:
        self._slide = slide
        self._level = level
        h, w = slide.levels[level].shape
        self.shape = (h, w, 3)
        self.native = slide._backend.lazy(level) if isinstance(slide._backend, _TiffBackend) else None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (3 - len(key))
        if len(key) > 3:
            raise IndexError(f"too many indices for a 3-D level array: {key!r}")
        h, w, _ = self.shape
        sel: list[Any] = []
        box = []
        for k, n in zip(key[:2], (h, w), strict=True):
            if isinstance(k, (int, np.integer)):
                i = int(k) + (n if k < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for axis of length {n}")
                box.append((i, i + 1))
                sel.append(0)
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0:
                    rng = range(start, stop, step)
                    if len(rng) == 0:
                        box.append((0, 0))
                        sel.append(slice(0, 0))
                    else:
                        lo = rng[-1]
                        box.append((lo, rng[0] + 1))
                        sel.append(slice(start - lo, None, step))
                else:
                    stop = max(stop, start)
                    box.append((start, stop))
                    sel.append(slice(None, None, step))
            else:
                raise IndexError(f"LevelArray supports integer and slice indices, got {k!r}")
        (y0, y1), (x0, x1) = box
        if y1 <= y0 or x1 <= x0:
            out = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 3), np.uint8)
        else:
            out = self._slide.read_region(x0, y0, x1 - x0, y1 - y0, level=self._level)
        return out[sel[0], sel[1], key[2]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self._slide.read_level(self._level)
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"LevelArray(level={self._level}, shape={self.shape}, dtype=uint8)"


# --------------------------------------------------------------------------------------------
# Slide


def _reopen(path: str, mpp: float | None, max_pixels: int, maxworkers: int) -> Slide:
    return open_slide(path, mpp=mpp, max_pixels=max_pixels, maxworkers=maxworkers)


class Slide:
    """An open slide or camera image; use :func:`open_slide` to create one.

    Attributes
    ----------
    path : pathlib.Path
    format : str
        ``tiff``, ``bigtiff``, ``ome-tiff``, ``svs``, ``ndpi``, ``scn``, ``bif``,
        ``philips-tiff``, ``png``, ``jpeg`` or ``openslide``.
    levels : list of Level
        Resolution levels, level 0 first (label/macro/thumbnail images excluded).
    shape : tuple of int
        Level-0 ``(height, width)``.
    mpp : float or None
        µm per level-0 pixel; ``None`` when unknown.
    mpp_source : str
        ``user``, ``svs``, ``ome``, ``tiff-resolution``, ``openslide`` or ``unknown``.
    mpp_warning : str or None
        Why the file's pixel size was not believed / is missing (also issued as
        :class:`PixelSizeWarning`).
    dtype : str
        Native sample type (e.g. ``uint8``, ``uint16``, ``float32``).
    samples_per_pixel : int
        Native samples per pixel (1 gray, 3 RGB, 4 RGBA, ...).
    conversion : str
        The rule applied to make uint8 RGB (see module docstring).
    objective_power : float or None
        Scanner magnification (SVS ``AppMag``, NDPI ``Magnification``).
    metadata : dict
        JSON-serialisable file metadata (SVS key/values such as ``AppMag``/``MPP``, OME
        physical sizes, TIFF Software/DateTime, compression ...).
    notes : list of str
        Other things the user should know (e.g. planes skipped).
    max_pixels : int
        Largest array (in pixels) this slide will materialise.
    """

    def __init__(self, path: Path, backend: _Backend, *, mpp: float | None,
                 max_pixels: int, maxworkers: int) -> None:
        self.path = path
        self._backend = backend
        self._user_mpp = mpp
        self.max_pixels = int(max_pixels)
        self.maxworkers = int(maxworkers)
        self.format = backend.format
        h0, w0 = backend.shapes[0]
        levels = []
        for i, (h, w) in enumerate(backend.shapes):
            ds = getattr(backend, "downsamples", None)
            downsample = float(ds[i]) if ds else 0.5 * (h0 / h + w0 / w)
            levels.append(Level(i, (int(h), int(w)), downsample, backend.tile_shapes[i]))
        self.levels: list[Level] = levels
        self.shape: tuple[int, int] = (int(h0), int(w0))
        self.metadata: dict = {k: _jsonable(v) for k, v in backend.metadata.items()}
        self.notes: list[str] = list(backend.notes)
        self.objective_power = backend.objective_power
        self._closed = False
        self.mpp, self.mpp_source, self.mpp_warning = self._resolve_mpp(mpp)
        if self.mpp_warning:
            warnings.warn(f"{path}: {self.mpp_warning}", PixelSizeWarning, stacklevel=3)

    # -- pixel size -------------------------------------------------------------------------
    def _resolve_mpp(self, user: float | None) -> tuple[float | None, str, str | None]:
        lo, hi = MPP_RANGE
        if user is not None:
            warn = None
            if not lo <= user <= hi:
                warn = (
                    f"the given mpp={user:g} µm/px is outside the usual {lo:g}-{hi:g} µm/px "
                    "range of microscope scans; using it as given"
                )
            return float(user), "user", warn
        problems = []
        for source, mx, my, problem in self._backend.mpp_candidates:
            if mx is None or my is None:
                if problem and source not in ("png", "jpeg"):
                    problems.append(f"{source}: {problem}")
                elif problem:
                    problems.append(problem)
                continue
            if not (math.isfinite(mx) and math.isfinite(my)) or mx <= 0 or my <= 0:
                problems.append(f"{source}: pixel size {mx:g} x {my:g} µm is not positive")
                continue
            if not (lo <= mx <= hi and lo <= my <= hi):
                problems.append(
                    f"{source}: pixel size {mx:.4g} x {my:.4g} µm/px is outside the plausible "
                    f"{lo:g}-{hi:g} µm/px range"
                )
                continue
            mpp = math.sqrt(mx * my)
            warn = None
            if abs(mx - my) > 0.01 * max(mx, my):
                warn = (
                    f"pixels are not square ({mx:.4g} x {my:.4g} µm); using the geometric mean "
                    f"{mpp:.4g} µm/px, which keeps areas exact"
                )
            return mpp, source, warn
        reason = "; ".join(problems) if problems else "the file records no pixel size"
        return None, "unknown", (
            f"pixel size unknown ({reason}); physical sizes and per-mm² numbers will be missing "
            "- pass mpp= (CLI: --mpp) to set it"
        )

    def mpp_at(self, level: int) -> float | None:
        """µm per pixel at ``level`` (``None`` when unknown)."""
        lv = self._level(level)
        return None if self.mpp is None else self.mpp * lv.downsample

    # -- properties --------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        return self._backend.pixfmt.dtype.name

    @property
    def samples_per_pixel(self) -> int:
        return int(self._backend.samples)

    @property
    def conversion(self) -> str:
        return self._backend.pixfmt.describe()

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def name(self) -> str:
        return self.path.name

    def _level(self, level: int) -> Level:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise InputError(f"level must be an integer, got {level!r}")
        if not 0 <= level < len(self.levels):
            raise InputError(
                f"{self.path}: level {level} does not exist (the slide has levels 0-"
                f"{len(self.levels) - 1})"
            )
        if self._closed:
            raise SlideError(self.path, "the slide has been closed")
        return self.levels[int(level)]

    # -- reading ----------------------------------------------------------------------------
    def read_region(self, x: int, y: int, w: int, h: int, *, level: int = 0) -> np.ndarray:
        """Read a rectangle of one level as uint8 RGB.

        Parameters
        ----------
        x, y : int
            Top-left corner in **that level's** pixel coordinates (column, row); may be
            negative or beyond the edge.
        w, h : int
            Width and height in that level's pixels (> 0).
        level : int
            Pyramid level (0 = full resolution).

        Returns
        -------
        numpy.ndarray
            uint8 ``(h, w, 3)``.  Parts outside the level are white (255).  Only the tiles the
            region touches are decoded; regions covering at least half of a page decode the
            whole page with ``maxworkers`` threads.

        Raises
        ------
        InputError
            Non-integer or non-positive sizes, a region larger than ``max_pixels``, or a
            missing level.
        SlideError
            The file's data cannot be decoded.
        """
        lv = self._level(level)
        vals = []
        for name, v in (("x", x), ("y", y), ("w", w), ("h", h)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InputError(f"read_region: {name} must be an integer, got {v!r}")
            vals.append(int(v))
        x, y, w, h = vals
        if w <= 0 or h <= 0:
            raise InputError(f"read_region: w and h must be positive, got w={w}, h={h}")
        if w * h > self.max_pixels:
            raise InputError(
                f"{self.path}: region {w}x{h} = {w * h:,} pixels exceeds max_pixels="
                f"{self.max_pixels:,}; read it in tiles or raise max_pixels"
            )
        H, W = lv.shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        with _reading(self.path, f"cannot decode level {lv.index} region x={x} y={y} {w}x{h}"):
            if x1 <= x0 or y1 <= y0:
                return np.full((h, w, 3), 255, np.uint8)
            native = self._backend.read(lv.index, y0, y1, x0, x1)
            if native.shape[:2] != (y1 - y0, x1 - x0):
                raise SlideError(
                    self.path,
                    f"level {lv.index} returned {native.shape[:2]} for a "
                    f"{y1 - y0}x{x1 - x0} request (corrupt file?)",
                )
            rgb = self._backend.pixfmt.convert(native, str(self.path))
            if (x0, y0, x1, y1) == (x, y, x + w, y + h):
                return np.ascontiguousarray(rgb)
            out = np.full((h, w, 3), 255, np.uint8)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = rgb
            return out

    def read_level(self, level: int) -> np.ndarray:
        """Whole level as uint8 ``(h, w, 3)``; refused (InputError) beyond ``max_pixels``."""
        lv = self._level(level)
        h, w = lv.shape
        if h * w > self.max_pixels:
            raise InputError(
                f"{self.path}: level {level} is {w}x{h} = {h * w:,} pixels, more than "
                f"max_pixels={self.max_pixels:,}; use a lower level, read_region, or raise "
                "max_pixels"
            )
        return self.read_region(0, 0, w, h, level=level)

    def level_array(self, level: int = 0) -> LevelArray:
        """Lazy uint8 RGB array-like of one level (see :class:`LevelArray`)."""
        self._level(level)
        with _reading(self.path, f"cannot open level {level} lazily"):
            return LevelArray(self, int(level))

    def best_level_for_downsample(self, downsample: float) -> int:
        """Index of the lowest-resolution level whose downsample is <= ``downsample``.

        A 0.1 % tolerance absorbs scanners' non-integer ratios (e.g. 4.0003).  Downsamples
        below 1 give level 0.
        """
        if not isinstance(downsample, (int, float, np.number)) or not math.isfinite(downsample):
            raise InputError(f"downsample must be a finite number, got {downsample!r}")
        best = 0
        for lv in self.levels:
            if lv.downsample <= downsample * 1.001:
                best = lv.index
        return best

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """Downsampled uint8 RGB image whose longer side is at most ``max_size``.

        Uses the lowest-resolution level whose longer side is still >= ``max_size`` (level 0
        only when no lower level is that large), read in bands of rows and reduced by an
        integer block mean, so memory stays bounded even without a pyramid.

        Returns
        -------
        rgb : numpy.ndarray
            uint8 ``(h, w, 3)``.
        downsample : float
            Level-0 pixels per thumbnail pixel (mean of the two axes).
        """
        if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
            raise InputError(f"thumbnail: max_size must be a positive integer, got {max_size!r}")
        chosen = self.levels[0]
        for lv in self.levels:
            if max(lv.shape) >= max_size:
                chosen = lv
        self._level(chosen.index)
        H, W = chosen.shape
        f = max(1, math.ceil(max(H, W) / max_size))
        oh, ow = -(-H // f), -(-W // f)
        if f == 1:
            rgb = self.read_level(chosen.index)
        else:
            out = np.empty((oh, ow, 3), np.uint8)
            rows_per_band = max(f, (16_000_000 // max(W, 1)) // f * f)
            for y0 in range(0, H, rows_per_band):
                y1 = min(y0 + rows_per_band, H)
                band = self.read_region(0, y0, W, y1 - y0, level=chosen.index)
                small = _block_mean(band, f)
                out[y0 // f : y0 // f + small.shape[0]] = small
            rgb = out
        h0, w0 = self.shape
        downsample = 0.5 * (h0 / rgb.shape[0] + w0 / rgb.shape[1])
        return rgb, float(downsample)

    # -- description -------------------------------------------------------------------------
    def info_dict(self) -> dict:
        """JSON-serialisable description of the slide (used by ``biopsyquant info``)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "shape": list(self.shape),
            "levels": [
                {
                    "index": lv.index,
                    "shape": list(lv.shape),
                    "downsample": round(lv.downsample, 4),
                    "tile_shape": list(lv.tile_shape) if lv.tile_shape else None,
                }
                for lv in self.levels
            ],
            "dtype": self.dtype,
            "samples_per_pixel": self.samples_per_pixel,
            "conversion": self.conversion,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "mpp_warning": self.mpp_warning,
            "objective_power": self.objective_power,
            "notes": list(self.notes),
            "metadata": dict(self.metadata),
        }

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file handle (idempotent)."""
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Callable[..., Slide], tuple]:
        # picklable for process pools: the receiver re-opens the file
        return _reopen, (str(self.path), self._user_mpp, self.max_pixels, self.maxworkers)

    def __repr__(self) -> str:
        mpp = f"{self.mpp:.4g} µm/px ({self.mpp_source})" if self.mpp else "mpp unknown"
        return (
            f"Slide({self.path.name!r}, {self.format}, {self.shape[1]}x{self.shape[0]}, "
            f"{len(self.levels)} level(s), {mpp})"
        )


# --------------------------------------------------------------------------------------------


def _validate_mpp(mpp: Any) -> float | None:
    if mpp is None:
        return None
    if isinstance(mpp, bool):
        raise InputError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    try:
        v = float(mpp)
    except (TypeError, ValueError):
        raise InputError(f"mpp must be a positive number of µm per pixel, got {mpp!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"mpp must be a positive, finite number of µm per pixel, got {mpp!r}")
    return v


def _import_openslide() -> Any:
    try:
        import openslide  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - ImportError or a broken shared library
        return None
    return openslide


def _openslide_fallback(path: str) -> _Backend | None:
    openslide = _import_openslide()
    if openslide is None:
        return None
    try:
        if openslide.OpenSlide.detect_format(path) is None:
            return None
        return _OpenSlideBackend(path, openslide)
    except Exception:  # noqa: BLE001 - keep the tifffile error, which is more specific
        return None


def open_slide(
    path: str | os.PathLike,
    *,
    mpp: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    maxworkers: int = 2,
) -> Slide:
    """Open a slide or camera image for lazy uint8 RGB reading.

    Parameters
    ----------
    path : str or PathLike
        TIFF/BigTIFF/OME-TIFF/SVS/NDPI/PNG/JPEG file, or (with the OpenSlide extra) any
        format OpenSlide reads.
    mpp : float, optional
        µm per level-0 pixel; overrides whatever the file says (``mpp_source == "user"``).
    max_pixels : int
        Largest number of pixels materialised in one array (default 2e9).  Whole-image
        formats and TIFF tiles/strips declaring more are refused from the header, before any
        allocation.
    maxworkers : int
        Decoder threads for multi-tile reads (default 2).

    Returns
    -------
    Slide
        Use as a context manager or call :meth:`Slide.close`.

    Raises
    ------
    SlideError
        Missing, empty, unrecognised, truncated, corrupt or unsupported file (the message
        names the file and the problem).
    InputError
        Invalid ``mpp``/``max_pixels``.
    """
    user_mpp = _validate_mpp(mpp)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise InputError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if isinstance(maxworkers, bool) or not isinstance(maxworkers, (int, np.integer)) or maxworkers < 1:
        raise InputError(f"maxworkers must be a positive integer, got {maxworkers!r}")
    p = Path(path)
    spath = str(p)
    if not p.exists():
        raise SlideError(p, "file not found")
    if p.is_dir():
        if p.suffix.lower() in (".mrxs",) or any(p.glob("*.mrxs")):
            raise SlideError(p, "is a directory; open the .mrxs file beside it instead")
        raise SlideError(p, "is a directory, not an image file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise SlideError(p, f"cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise SlideError(p, "file is empty (0 bytes)")

    backend: _Backend
    if head[:4] in _TIFF_MAGIC:
        try:
            backend = _TiffBackend(spath, max_pixels=int(max_pixels), maxworkers=int(maxworkers))
        except SlideError:
            # a TIFF-based scanner format tifffile cannot decode may still be OpenSlide's
            backend = _openslide_fallback(spath)
            if backend is None:
                raise
    elif head.startswith(_PNG_MAGIC):
        backend = _ImageBackend(spath, "png", max_pixels=int(max_pixels))
    elif head.startswith(_JPEG_MAGIC):
        backend = _ImageBackend(spath, "jpeg", max_pixels=int(max_pixels))
    else:
        openslide = _import_openslide()
        if openslide is None:
            raise SlideError(
                p,
                "not a TIFF, PNG or JPEG image (unrecognised file signature "
                f"{head[:8]!r}); {_OPENSLIDE_HINT}",
            )
        with _reading(p, "OpenSlide cannot identify the file"):
            vendor = openslide.OpenSlide.detect_format(spath)
        if vendor is None:
            raise SlideError(
                p, "not an image biopsyquant or OpenSlide can read (unrecognised format)"
            )
        backend = _OpenSlideBackend(spath, openslide)
    if isinstance(backend, _OpenSlideBackend):
        h0, w0 = backend.shapes[0]
        if h0 * w0 > MAX_DECLARED_PIXELS:
            backend.close()
            raise SlideError(p, f"declares an implausible {w0}x{h0}-pixel image")

    try:
        slide = Slide(p, backend, mpp=user_mpp, max_pixels=int(max_pixels),
                      maxworkers=int(maxworkers))
        # decode one tile of the smallest level now, so unreadable compressions, truncated
        # data and out-of-range float samples fail at open with a clear message
        if backend.format not in ("png", "jpeg"):
            small = slide.levels[-1]
            th, tw = small.tile_shape or small.shape
            try:
                slide.read_region(0, 0, min(tw, small.width, 256), min(th, small.height, 256),
                                  level=small.index)
            except SlideError as exc:
                raise SlideError(p, f"the image data cannot be decoded: {exc.problem}") from exc
    except BaseException:
        backend.close()
        raise
    return slide
