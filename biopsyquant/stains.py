"""Colour deconvolution of brightfield IHC (Ruifrok & Johnston 2001).

Optical density (OD) is always in **log10 units relative to the slide's own background**
(glass) intensity ``I0`` per RGB channel: ``OD_c = -log10(I_c / I0_c)``, clipped at 0.
Stain concentrations are the OD unmixed by the inverse of the stain matrix, also in log10 OD
units.  (Note: ``skimage.color.rgb2hed`` returns natural-log OD with a fixed white background,
not comparable to these numbers.)

Fast path: :func:`deconvolve`, :func:`stain_od`, :func:`dab_threshold_counts` and
:func:`dab_classes` run fused numba kernels (:mod:`biopsyquant._kernels`) on uint8 RGB with
per-channel lookup tables premultiplied by the unmixing matrix, float32 output, parallel over
rows; they agree with the float64 formula to ~1e-6 OD.

Per slide: :func:`estimate_background` measures the glass intensity, :func:`estimate_stains`
estimates the two stain vectors (Macenko et al. 2009) with a preset fallback whose reason is
recorded, and :func:`save_stains` / :func:`load_stains` keep the model in JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

__all__ = [
    "StainModel",
    "PRESETS",
    "preset",
    "optical_density",
    "deconvolve",
    "stain_od",
    "ThresholdCounts",
    "dab_threshold_counts",
    "dab_classes",
    "estimate_background",
    "estimate_stains",
    "save_stains",
    "load_stains",
]

# Normalised RGB OD vectors (Ruifrok & Johnston 2001 / QuPath defaults).
HEMATOXYLIN = (0.651, 0.701, 0.290)
DAB = (0.269, 0.568, 0.778)
EOSIN = (0.072, 0.990, 0.105)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n == 0:
        raise InputError(f"stain vector {tuple(v)} has zero or non-finite length")
    return v / n


def _complete_matrix(vectors: np.ndarray) -> np.ndarray:
    """Return a 3x3 matrix of unit row vectors; a missing third row is the cross product."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.shape == (2, 3):
        # Residual = the direction orthogonal to the two stains (as skimage's hdx matrix):
        # the two stain concentrations are then unaffected by off-plane colour, and the
        # matrix is as well conditioned as the two stains allow.  (Taking absolute values of
        # the cross product, as some tools do, puts the residual almost in the stain plane and
        # makes the matrix nearly singular for H-DAB: det -0.01 instead of 0.60.)
        third = np.cross(_unit(vectors[0]), _unit(vectors[1]))
        if third.sum() < 0:
            third = -third
        vectors = np.vstack([vectors, third])
    if vectors.shape != (3, 3):
        raise InputError(f"stain matrix must have shape (2, 3) or (3, 3), got {vectors.shape}")
    return np.vstack([_unit(r) for r in vectors])


@dataclass(frozen=True)
class StainModel:
    """Stain vectors plus the background (glass) intensity of one slide.

    Parameters
    ----------
    names : tuple of str
        Names of the three stains, e.g. ``("hematoxylin", "dab", "residual")``.
    vectors : ndarray, shape (3, 3)
        Unit OD vectors, one row per stain, columns R, G, B.
    background : tuple of float
        Background (glass) intensity per channel R, G, B on the 0-255 scale.
    source : str
        Where the vectors come from: ``"preset:H-DAB"``, ``"estimated"``, ``"user"``, ...
    """

    names: tuple[str, str, str]
    vectors: np.ndarray
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)
    source: str = "user"
    _inverse: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        m = _complete_matrix(self.vectors)
        object.__setattr__(self, "vectors", m)
        m.setflags(write=False)
        bg = tuple(float(b) for b in self.background)
        if len(bg) != 3 or not all(np.isfinite(bg)) or min(bg) <= 0 or max(bg) > 65535:
            raise InputError(f"background must be 3 positive intensities, got {self.background}")
        object.__setattr__(self, "background", bg)
        if len(self.names) != 3:
            raise InputError(f"names must name 3 stains, got {self.names}")
        object.__setattr__(self, "names", tuple(self.names))
        if abs(np.linalg.det(m)) < 1e-6:
            raise InputError(
                f"stain vectors {m.round(3).tolist()} are linearly dependent: they cannot be unmixed"
            )
        inv = np.linalg.inv(m)
        inv.setflags(write=False)
        object.__setattr__(self, "_inverse", inv)

    @property
    def inverse(self) -> np.ndarray:
        """Unmixing matrix: ``concentrations = OD @ inverse`` (shape (3, 3))."""
        return self._inverse

    def index(self, name: str) -> int:
        """Index of stain ``name`` (e.g. ``"dab"``) in :attr:`names`."""
        try:
            return self.names.index(name)
        except ValueError:
            raise InputError(
                f"stain {name!r} is not in this stain model; it has {list(self.names)}"
            ) from None

    def with_background(self, background) -> StainModel:
        """Copy with another background intensity."""
        return StainModel(self.names, self.vectors, tuple(background), self.source)

    def to_dict(self) -> dict:
        """JSON-serialisable description (names, vectors, background, source)."""
        return {
            "names": list(self.names),
            "vectors": [[round(float(x), 6) for x in row] for row in self.vectors],
            "background": [round(float(b), 3) for b in self.background],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StainModel:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(tuple(d["names"]), np.asarray(d["vectors"], float),
                       tuple(d.get("background", (255.0, 255.0, 255.0))),
                       d.get("source", "user"))
        except (KeyError, TypeError) as exc:
            raise InputError(f"invalid stain model description: {exc}") from None


PRESETS: dict[str, StainModel] = {
    "H-DAB": StainModel(("hematoxylin", "dab", "residual"), np.array([HEMATOXYLIN, DAB]),
                        source="preset:H-DAB"),
    "H-E": StainModel(("hematoxylin", "eosin", "residual"), np.array([HEMATOXYLIN, EOSIN]),
                      source="preset:H-E"),
    "H-E-DAB": StainModel(("hematoxylin", "eosin", "dab"), np.array([HEMATOXYLIN, EOSIN, DAB]),
                          source="preset:H-E-DAB"),
}


def preset(name: str) -> StainModel:
    """Return the named stain preset (``"H-DAB"``, ``"H-E"``, ``"H-E-DAB"``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown stain preset {name!r}; choose one of {sorted(PRESETS)}") from None


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise InputError(
            f"`rgb` must have 3 channels along the last axis, got shape {rgb.shape}; "
            "drop alpha with rgb[..., :3]"
        )
    if rgb.dtype != np.uint8:
        raise InputError(f"`rgb` must be uint8, got {rgb.dtype}; open images with open_slide")
    return rgb


def _od_luts(background) -> np.ndarray:
    """(3, 256) float64 lookup tables of clipped OD per channel for intensities 0..255."""
    v = np.maximum(np.arange(256, dtype=np.float64), 1.0)  # avoid log(0): cap OD at log10(I0)
    bg = np.asarray(background, dtype=np.float64)[:, None]
    return np.maximum(-np.log10(v[None, :] / bg), 0.0)


def optical_density(rgb: np.ndarray, background=(255.0, 255.0, 255.0)) -> np.ndarray:
    """Per-channel optical density, log10, relative to ``background``, clipped at 0.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    background : sequence of 3 float
        Glass intensity per channel (0-255).

    Returns
    -------
    ndarray of float32, shape (H, W, 3)
    """
    rgb = _check_rgb(rgb)
    luts = _od_luts(background).astype(np.float32)
    out = np.empty(rgb.shape, np.float32)
    for c in range(3):
        np.take(luts[c], rgb[..., c], out=out[..., c])
    return out


def _check_out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape:
        raise InputError(
            f"`out` must be a float32 array of shape {shape}, got "
            f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}"
        )
    return out


def _deconvolution_luts(model: StainModel) -> np.ndarray:
    """float32 (3 channels, 256, 3 stains): ``OD_c(v) * inverse[c, s]``."""
    luts = _od_luts(model.background)  # (3, 256) float64
    return np.ascontiguousarray(
        (luts[:, :, None] * model.inverse[:, None, :]).astype(np.float32)
    )


def _stain_lut(model: StainModel, stain: str) -> np.ndarray:
    """float32 (3 channels, 256): contribution of channel c at intensity v to ``stain``."""
    s = model.index(stain)
    luts = _od_luts(model.background)
    return np.ascontiguousarray((luts * model.inverse[:, s][:, None]).astype(np.float32))


def deconvolve(rgb: np.ndarray, model: StainModel, *, out: np.ndarray | None = None) -> np.ndarray:
    """Unmix an RGB image into stain concentrations (log10 OD units).

    Fused compiled kernel: per pixel and stain, three look-ups in tables of
    ``OD_c(v) * inverse[c, s]`` and two float32 additions (no float image in between).
    Agrees with the float64 formula ``clip(-log10(max(I, 1) / I0), 0) @ inverse`` to ~1e-6 OD.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    model : StainModel
        Stain vectors and background intensity.
    out : ndarray of float32, shape (H, W, 3), optional
        Buffer to write into (reusing buffers is faster on whole slides).

    Returns
    -------
    ndarray of float32, shape (H, W, 3)
        Concentration of each stain of ``model.names``, in OD (log10) units.  May be
        negative (noise, or colours off the stain plane); not clipped.

    Examples
    --------
    >>> from skimage.data import immunohistochemistry
    >>> rgb = immunohistochemistry()
    >>> conc = deconvolve(rgb, preset("H-DAB"))
    >>> conc.shape, conc.dtype
    ((512, 512, 3), dtype('float32'))
    """
    from . import _kernels

    rgb = _check_rgb(rgb)
    out = _check_out(out, rgb.shape)
    _kernels.deconvolve_into(rgb, _deconvolution_luts(model), out)
    return out


def stain_od(rgb: np.ndarray, model: StainModel, stain: str = "dab", *,
             out: np.ndarray | None = None) -> np.ndarray:
    """Concentration of one stain (log10 OD units), fused compiled kernel.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    model : StainModel
    stain : str
        Name of the stain in ``model.names`` (``"dab"``, ``"hematoxylin"``, ...).
    out : ndarray of float32, shape (H, W), optional
        Buffer to write into.

    Returns
    -------
    ndarray of float32, shape (H, W)
        Same values as ``deconvolve(rgb, model)[..., model.index(stain)]``.
    """
    from . import _kernels

    rgb = _check_rgb(rgb)
    lut = _stain_lut(model, stain)
    out = _check_out(out, rgb.shape[:2])
    _kernels.stain_into(rgb, lut, out)
    return out


def _deconvolve_numpy(rgb: np.ndarray, model: StainModel) -> np.ndarray:
    """Pure-numpy premultiplied-LUT deconvolution (kept for benchmarks and as a cross-check)."""
    rgb = _check_rgb(rgb)
    lut = _deconvolution_luts(model)
    out = np.empty(rgb.shape, np.float32)
    for s in range(3):
        o = out[..., s]
        np.take(lut[0, :, s], rgb[..., 0], out=o)
        o += np.take(lut[1, :, s], rgb[..., 1])
        o += np.take(lut[2, :, s], rgb[..., 2])
    return out


def _stain_od_numpy(rgb: np.ndarray, model: StainModel, stain: str = "dab") -> np.ndarray:
    """Pure-numpy premultiplied-LUT single-stain OD (benchmarks / cross-check)."""
    rgb = _check_rgb(rgb)
    pre = _stain_lut(model, stain)
    out = np.take(pre[0], rgb[..., 0])
    out += np.take(pre[1], rgb[..., 1])
    out += np.take(pre[2], rgb[..., 2])
    return out


# ------------------------------------------------------------------------------------------
# fused threshold scoring (no float image)
# ------------------------------------------------------------------------------------------
class ThresholdCounts(NamedTuple):
    """Pixel counts and OD sums per intensity class (additive over tiles).

    Attributes
    ----------
    counts : ndarray of int64, shape (k + 1,)
        ``counts[i]`` = pixels with exactly ``i`` thresholds ``<=`` their stain OD
        (0 = negative, 1 = weak 1+, 2 = moderate 2+, 3 = strong 3+ for three thresholds).
    od_sum : ndarray of float64, shape (k + 1,)
        Sum of the stain OD (log10 units, unclipped) over the pixels of each class, each
        pixel's OD rounded to 2**-20 (~1e-6) OD and summed exactly as integers — so sums do not
        depend on the order of pixels or tiles and add up exactly over tiles;
        ``od_sum.sum() / counts.sum()`` is the mean OD of all counted pixels (to < 1e-6).
    """

    counts: np.ndarray
    od_sum: np.ndarray

    @property
    def total(self) -> int:
        """Number of pixels counted."""
        return int(self.counts.sum())

    @property
    def mean_od(self) -> float:
        """Mean stain OD over all counted pixels (NaN when none)."""
        n = self.total
        return float(self.od_sum.sum() / n) if n else float("nan")

    def __add__(self, other):  # tiles sum
        if isinstance(other, ThresholdCounts):
            return ThresholdCounts(self.counts + other.counts, self.od_sum + other.od_sum)
        return NotImplemented


def _check_thresholds(thresholds) -> np.ndarray:
    try:
        t = np.asarray(thresholds, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise InputError(f"`thresholds` must be numbers (OD), got {thresholds!r}") from None
    if t.size == 0 or t.size > 254 or not np.all(np.isfinite(t)) or np.any(np.diff(t) < 0):
        raise InputError(
            f"`thresholds` must be 1-254 finite, non-decreasing OD values, got {thresholds!r}"
        )
    return np.ascontiguousarray(t, dtype=np.float32)  # compared with the float32 OD


def _check_mask(mask, shape: tuple[int, int], name: str = "mask") -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != shape:
        raise InputError(f"`{name}` has shape {m.shape}, image has {shape}")
    return m if m.dtype == np.bool_ else m.astype(bool)


def dab_threshold_counts(rgb: np.ndarray, model: StainModel, thresholds=(0.2, 0.4, 0.6),
                         mask: np.ndarray | None = None, *, stain: str = "dab"
                         ) -> ThresholdCounts:
    """Count pixels per DAB intensity class in one fused pass (no float image).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    model : StainModel
    thresholds : sequence of float
        Non-decreasing OD thresholds (log10 units); default QuPath's 1+/2+/3+ tiers
        (0.2, 0.4, 0.6).  A pixel's class is the number of thresholds ``<=`` its OD.
    mask : ndarray of bool, shape (H, W), optional
        Count only where True (e.g. analysed tissue).
    stain : str
        Stain to score (default ``"dab"``).

    Returns
    -------
    ThresholdCounts
        ``counts`` (int64, k + 1) and ``od_sum`` (float64, k + 1) per class.
    """
    from . import _kernels

    rgb = _check_rgb(rgb)
    t = _check_thresholds(thresholds)
    m = _check_mask(mask, rgb.shape[:2])
    counts, sums = _kernels.threshold_counts(rgb, _stain_lut(model, stain), t, m)
    return ThresholdCounts(counts, sums)


def dab_classes(rgb: np.ndarray, model: StainModel, thresholds=(0.2, 0.4, 0.6),
                mask: np.ndarray | None = None, *, stain: str = "dab", outside: int = 255,
                out: np.ndarray | None = None) -> np.ndarray:
    """DAB intensity class of every pixel in one fused pass.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    model : StainModel
    thresholds : sequence of float
        Non-decreasing OD thresholds (log10 units), default (0.2, 0.4, 0.6).
    mask : ndarray of bool, shape (H, W), optional
        Pixels outside the mask get ``outside``.
    stain : str
        Stain to classify (default ``"dab"``).
    outside : int
        Value (0-255) for pixels outside ``mask``; default 255.
    out : ndarray of uint8, shape (H, W), optional
        Buffer to write into.

    Returns
    -------
    ndarray of uint8, shape (H, W)
        Number of thresholds ``<=`` the pixel's OD: 0 negative, 1 weak (1+), 2 moderate (2+),
        3 strong (3+) for three thresholds; ``outside`` where ``mask`` is False.  Agrees with
        ``dab_threshold_counts`` pixel for pixel.
    """
    from . import _kernels

    rgb = _check_rgb(rgb)
    t = _check_thresholds(thresholds)
    m = _check_mask(mask, rgb.shape[:2])
    if not 0 <= int(outside) <= 255:
        raise InputError(f"`outside` must be 0-255, got {outside}")
    if out is None:
        out = np.empty(rgb.shape[:2], np.uint8)
    elif not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != rgb.shape[:2]:
        raise InputError(f"`out` must be a uint8 array of shape {rgb.shape[:2]}")
    _kernels.threshold_classes(rgb, _stain_lut(model, stain), t, m, int(outside), out)
    return out


# ------------------------------------------------------------------------------------------
# background (glass) estimation
# ------------------------------------------------------------------------------------------
def _sample_pixels(rgb: np.ndarray, mask: np.ndarray | None, max_pixels: int,
                   seed: int = 0) -> np.ndarray:
    """(n, 3) uint8 pixels of ``rgb`` (where ``mask``), at most about ``max_pixels``.

    Without a mask: a regular grid (every k-th row and column); with a mask: a reproducible
    random draw (with replacement) among the mask's pixels.
    """
    h, w = rgb.shape[:2]
    if mask is None:
        n = h * w
        if n <= max_pixels:
            return rgb.reshape(-1, 3)
        k = int(np.ceil(np.sqrt(n / max_pixels)))
        return rgb[k // 2 :: k, k // 2 :: k].reshape(-1, 3)
    flat = np.flatnonzero(mask)
    if flat.size > max_pixels:
        rng = np.random.default_rng(seed)
        flat = np.sort(flat[rng.integers(0, flat.size, size=max_pixels)])
    return rgb[flat // w, flat % w]


def estimate_background(
    rgb: np.ndarray,
    *,
    tissue_mask: np.ndarray | None = None,
    max_saturation: float = 0.15,
    min_brightness: float = 150.0,
    min_pixels: int = 200,
    max_pixels: int = 1_000_000,
    default: float = 255.0,
) -> tuple[float, float, float]:
    """Background (glass) intensity per channel, from the slide's own bright unstained pixels.

    Glass candidates are pixels outside ``tissue_mask`` that are bright (mean of R, G, B
    ``>= min_brightness``) and nearly achromatic (``(max - min) / max <= max_saturation``).
    Within them the brightest peak of the brightness histogram (smoothed, σ = 1.5 levels) that
    is at least 2 % as high as the highest peak and holds at least ``min_pixels`` and 0.2 % of
    the candidates is taken as glass (pale unstained tissue forms a darker, broader peak; glass
    covering 2 % of a field is still found); the background of each channel is the median of
    that channel over the pixels under the peak (within its half-maximum width).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        Image or low-resolution thumbnail of the slide.
    tissue_mask : ndarray of bool, shape (H, W), optional
        Pixels known to be tissue; they are never used as glass.
    max_saturation : float
        Largest ``(max - min) / max`` of a glass pixel (0-1).
    min_brightness : float
        Smallest mean intensity (0-255) of a glass pixel.
    min_pixels : int
        Fewer glass pixels than this means "no glass": a warning is issued and ``default``
        returned for every channel.
    max_pixels : int
        At most about this many pixels are used (regular grid / reproducible draw).
    default : float
        Fallback intensity when no glass is visible (e.g. a camera field inside the tissue).

    Returns
    -------
    tuple of 3 float
        Background intensity R, G, B on the 0-255 scale.

    Warns
    -----
    UserWarning
        When no glass is found and ``default`` is returned.
    """
    rgb = _check_rgb(rgb)
    m = _check_mask(tissue_mask, rgb.shape[:2], "tissue_mask")
    pix = _sample_pixels(rgb, None if m is None else ~m, max_pixels)
    fallback = (float(default),) * 3
    if pix.shape[0] >= min_pixels:
        p = pix.astype(np.int16)
        mx = p.max(axis=1)
        mn = p.min(axis=1)
        bright = p.sum(axis=1) / 3.0
        cand = (bright >= min_brightness) & ((mx - mn) <= max_saturation * np.maximum(mx, 1))
        if int(cand.sum()) >= min_pixels:
            b = bright[cand]
            hist = np.bincount(np.round(b).astype(np.int64), minlength=256).astype(np.float64)
            hist = ndi.gaussian_filter1d(hist, 1.5, mode="constant")
            peaks = np.flatnonzero(
                (hist >= np.maximum(np.roll(hist, 1), np.roll(hist, -1)))
                & (hist >= 0.02 * hist.max())
            )
            need = max(min_pixels, int(0.002 * b.size))
            for peak in peaks[::-1]:  # brightest first: glass is brighter than pale tissue
                half = 0.5 * hist[peak]
                lo = peak
                # half-maximum width, stopping at a valley so that a neighbouring (tissue)
                # peak is never merged into the glass peak
                while lo > 0 and half <= hist[lo - 1] <= hist[lo]:
                    lo -= 1
                hi = peak
                while hi < 255 and half <= hist[hi + 1] <= hist[hi]:
                    hi += 1
                sel = (b >= lo - 0.5) & (b <= hi + 0.5)
                if int(sel.sum()) >= need:
                    glass = pix[cand][sel]
                    return tuple(float(v) for v in np.median(glass, axis=0))
    warnings.warn(
        f"no glass found in the image (fewer than {min_pixels} bright, unsaturated pixels "
        f"outside tissue); assuming background intensity {default:g} for R, G and B",
        UserWarning, stacklevel=2,
    )
    return fallback


# ------------------------------------------------------------------------------------------
# stain vector estimation (Macenko et al. 2009)
# ------------------------------------------------------------------------------------------
_DISPLAY = {"dab": "DAB", "hematoxylin": "hematoxylin", "eosin": "eosin"}


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def estimate_stains(
    rgb: np.ndarray,
    *,
    base: str = "H-DAB",
    tissue_mask: np.ndarray | None = None,
    background=None,
    od_min: float = 0.15,
    grey_tolerance: float = 3.0,
    percentile: float = 1.0,
    max_angle: float = 25.0,
    min_separation: float = 15.0,
    min_pixels: int = 500,
    min_stain_fraction: float = 0.005,
    confident_od: float = 0.5,
    min_confident_pixels: int = 100,
    max_pixels: int = 250_000,
    seed: int = 0,
) -> StainModel:
    """Estimate the slide's two stain vectors (Macenko-style) and its background.

    1. Background: ``background`` if given, else :func:`estimate_background`.
    2. Pixels: tissue pixels (``tissue_mask``, or the whole image), at most ``max_pixels``
       sampled reproducibly; near-background pixels (sum of R, G, B OD < ``od_min``) and
       near-grey pixels (OD direction within ``grey_tolerance`` degrees of (1, 1, 1): black
       pen, dust, folds) are dropped.
    3. The stain plane through the origin is spanned by the two main eigenvectors of the
       (uncentred) second-moment matrix of the OD vectors; pixel directions in that plane
       are measured as angles.
    4. Pixels are split by the closer of the ``base`` preset's two vectors; the
       ``percentile`` percentile of the first stain's angles and the ``100 - percentile``
       percentile of the second's give the two pure-stain directions (Macenko's robust
       extremes, taken per stain so that a stain covering only a few percent of the pixels —
       nuclei in H&E muscle, sparse DAB — is estimated from its own pixels).  The extremes
       are taken only over each stain's *confidently stained* pixels, total OD >=
       ``confident_od``: the direction of a pale pixel is dominated by camera noise, JPEG
       chroma and uneven illumination, and the extremes over all pixels overshoot the true
       vectors (by 2-7° on generated sections with scarce granular DAB, which made the IL-1
       H-score 10-17 % too high; see ``benchmarks/validate_stains.py``).
    5. Scarce stains: when the second stain (DAB) has fewer than ``min_confident_pixels``
       confident pixels, its vector is **kept at the preset** (a few dark pixels do not define
       a direction) and the first stain is still estimated; ``source`` says so, e.g.
       ``"estimated (DAB kept at the preset: 40 pixels with total OD >= 0.5 of 90000, need
       100)"``.  When the first stain (the counterstain, always present but often pale) has
       fewer, its ``min_confident_pixels`` darkest pixels are used and ``source`` says so.

    Falls back to the preset — with the estimated background and the reason in ``source``,
    e.g. ``"preset:H-DAB (estimation failed: too few DAB pixels (12 of 40000; need 200))"``
    — when there are fewer than ``min_pixels`` usable pixels, when either stain has fewer
    than ``max(min_pixels / 5, min_stain_fraction * n)`` pixels, when an estimated vector is more than ``max_angle`` degrees from its preset, or when the
    two are less than ``min_separation`` degrees apart.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    base : str
        Preset giving names and reference vectors: ``"H-DAB"`` or ``"H-E"``.  For the
        three-stain ``"H-E-DAB"`` the preset is returned with the slide's background and
        ``source="preset:H-E-DAB (not estimated: estimation needs a two-stain base)"``.
    tissue_mask : ndarray of bool, shape (H, W), optional
    background : sequence of 3 float, optional
        Glass intensity R, G, B (0-255); estimated from ``rgb`` when None.
    od_min : float
        Minimum total OD (sum over R, G, B, log10 units) of a pixel used.
    grey_tolerance : float
        Pixels whose OD direction is within this angle (degrees) of grey are dropped.
    percentile : float
        Percentile (0-50) of the in-plane angle taken as the extreme (pure stain) direction.
    max_angle : float
        Largest plausible angle (degrees) between an estimated vector and its preset.
    min_separation : float
        Smallest plausible angle (degrees) between the two estimated vectors.
    min_pixels : int
        Minimum number of usable pixels.
    min_stain_fraction : float
        Minimum fraction of the usable pixels that each stain must have (0.5 %).
    confident_od : float
        Total OD (sum over R, G, B, log10 units) from which a pixel counts as confidently
        stained; the pure-stain extremes are taken over these pixels.  ``0`` (or ``od_min``)
        reproduces the earlier estimator that used every pixel above ``od_min``.
    min_confident_pixels : int
        Fewest confident pixels (in the sample of at most ``max_pixels``) from which a stain's
        vector is estimated; below it DAB (the second stain) keeps the preset vector and the
        first stain uses its darkest ``min_confident_pixels`` pixels.  Below ~100 pixels the
        DAB estimate wanders by 3-5° on generated sections (``docs/_parts/stains-validation.md``).
    max_pixels : int
        At most about this many pixels are used (a regular grid, or a random draw with
        ``seed`` among the ``tissue_mask`` pixels).
    seed : int
        Seed of the random draw.

    Returns
    -------
    StainModel
        ``source="estimated"`` when both vectors were estimated from confident pixels,
        ``"estimated (<notes>)"`` when a stain was kept at the preset or estimated from its
        darkest pixels (step 5), or the preset with the failure reason; the third vector is
        the residual (cross product); ``background`` is the slide's background.
    """
    rgb = _check_rgb(rgb)
    ref = preset(base)
    if not 0 < percentile < 50:
        raise InputError(f"`percentile` must be in (0, 50), got {percentile}")
    m = _check_mask(tissue_mask, rgb.shape[:2], "tissue_mask")
    if background is None:
        background = estimate_background(rgb, tissue_mask=m)
    bg = tuple(float(b) for b in background)
    if ref.names[2] != "residual":  # three stains: Macenko's plane cannot hold them
        return StainModel(ref.names, ref.vectors, bg,
                          f"preset:{base} (not estimated: estimation needs a two-stain base)")

    def fallback(reason: str) -> StainModel:
        return StainModel(ref.names, ref.vectors[:2], bg,
                          f"preset:{base} (estimation failed: {reason})")

    pix = _sample_pixels(rgb, m, max_pixels, seed)
    luts = _od_luts(bg)
    od = np.stack([luts[c][pix[:, c]] for c in range(3)], axis=1)  # (n, 3) float64
    od = od[od.sum(axis=1) >= od_min]
    norm = np.linalg.norm(od, axis=1)
    grey_cos = od.sum(axis=1) / (np.sqrt(3.0) * np.maximum(norm, 1e-12))
    od = od[grey_cos < np.cos(np.radians(grey_tolerance))]
    n = od.shape[0]
    if n < min_pixels:
        return fallback(f"too few stained tissue pixels ({n}; need {min_pixels})")

    # split the pixels by the closer preset vector; each stain needs enough pixels
    r0, r1 = ref.vectors[0], ref.vectors[1]
    closer1 = (od @ r1) > (od @ r0)
    need = max(min_pixels // 5, int(np.ceil(min_stain_fraction * n)))
    for name, count in ((ref.names[0], int(n - closer1.sum())), (ref.names[1], int(closer1.sum()))):
        if count < need:
            return fallback(f"too few {_DISPLAY.get(name, name)} pixels ({count} of {n}; need {need})")

    # plane through the origin: two main axes of the uncentred second moments
    _, vecs = np.linalg.eigh(od.T @ od / n)
    e1, e2 = vecs[:, 2], vecs[:, 1]
    if e1.sum() < 0:
        e1 = -e1
    if np.arctan2(r0 @ e2, r0 @ e1) > np.arctan2(r1 @ e2, r1 @ e1):
        e2 = -e2  # orient the plane so that the first stain has the smaller angle
    proj = od @ np.stack([e1, e2], axis=1)
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    # robust extreme of each stain (Macenko's percentiles), taken per stain over its own
    # *confidently stained* pixels (total OD >= confident_od): the angle of a pale pixel is
    # dominated by camera noise, JPEG chroma and uneven illumination, so the extremes over all
    # pixels overshoot the true direction (by 2-7 degrees on the generated sections)
    total = od.sum(axis=1)
    confident = total >= confident_od
    cand, notes = [], []
    for k, (own, q) in enumerate(((~closer1, percentile), (closer1, 100 - percentile))):
        label = _DISPLAY.get(ref.names[k], ref.names[k])
        use = own & confident
        n_conf = int(use.sum())
        if n_conf < max(min_confident_pixels, 1):
            if k == 1:
                # scarce target stain (little DAB on the slide): its few dark pixels do not
                # define a direction; keep the preset, the counterstain is still estimated
                cand.append(ref.vectors[1].copy())
                notes.append(
                    f"{label} kept at the preset: {n_conf} pixels with total OD >= "
                    f"{confident_od:g} of {n}, need {min_confident_pixels}")
                continue
            # pale counterstain: its darkest `min_confident_pixels` pixels instead
            idx = np.flatnonzero(own)
            use = idx[np.argsort(total[idx])[-min_confident_pixels:]]
            notes.append(f"{label} from its {use.size} darkest pixels ({n_conf} with total OD "
                         f">= {confident_od:g})")
        a = np.percentile(phi[use], q)
        v = np.cos(a) * e1 + np.sin(a) * e2
        if v.sum() < 0:
            v = -v
        cand.append(v / np.linalg.norm(v))
    v0, v1 = cand
    ang0, ang1 = _angle_deg(v0, r0), _angle_deg(v1, r1)
    for name, ang in ((ref.names[0], ang0), (ref.names[1], ang1)):
        if ang > max_angle:
            return fallback(
                f"{_DISPLAY.get(name, name)} vector {ang:.1f}° from the preset (max {max_angle:g}°)"
            )
    sep = _angle_deg(v0, v1)
    if sep < min_separation:
        return fallback(f"estimated vectors only {sep:.1f}° apart (min {min_separation:g}°)")
    if min(v0.min(), v1.min()) < -0.05:
        return fallback("an estimated vector has a negative OD component")
    v0, v1 = np.clip(v0, 0, None), np.clip(v1, 0, None)
    source = "estimated" + (f" ({'; '.join(notes)})" if notes else "")
    return StainModel(ref.names, np.stack([v0, v1]), bg, source)


# ------------------------------------------------------------------------------------------
# JSON persistence
# ------------------------------------------------------------------------------------------
_JSON_KIND = "biopsyquant-stain-model"


def save_stains(model: StainModel, path: str | os.PathLike) -> Path:
    """Write ``model`` (names, vectors, background, source) to a JSON file, atomically.

    Parameters
    ----------
    model : StainModel
    path : str or Path
        Destination; written via a temporary file in the same folder and ``os.replace``.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    doc = {"kind": _JSON_KIND, "format_version": 1, "od_units": "log10, relative to background",
           **model.to_dict()}
    text = json.dumps(doc, indent=2) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(f"{path}: cannot write stain model ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"{path}: cannot write stain model ({exc.strerror or exc})") from None
    return path


def load_stains(path: str | os.PathLike) -> StainModel:
    """Read a stain model written by :func:`save_stains` (or any JSON with the same keys).

    Raises
    ------
    InputError
        Naming the file when it is missing, not JSON, or not a valid stain model.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: stain model file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON stain model ({exc})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: a stain model must be a JSON object, got {type(doc).__name__}")
    kind = doc.get("kind", _JSON_KIND)
    if kind != _JSON_KIND:
        raise InputError(f"{path}: expected kind {_JSON_KIND!r}, got {kind!r}")
    try:
        return StainModel.from_dict(doc)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    except (ValueError, np.linalg.LinAlgError) as exc:
        raise InputError(f"{path}: invalid stain model ({exc})") from None
