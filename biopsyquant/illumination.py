"""Uneven illumination (flat-field) correction from the slide's own glass.

Brightfield fields are rarely evenly lit: a camera image is brighter at the optical centre
(vignetting) and a lamp or condenser slightly off axis adds a gradient. Optical density is
measured against *one* background intensity per slide, so a field that is 5 % brighter over
the tissue than over the glass where the background was read lowers every OD there by
``log10(1.05)`` = 0.02 — enough to move faint DAB below the 0.2 OD tier of an H-score (the
synthetic IL-1 sections with 10 % illumination lost 6–8 % of their H-score this way).

:func:`fit_flat_field` models the illumination as

``log10 L(u, v) = k + a·u + b·v + c·(u² + v²)``

in slide coordinates ``u = (x - W/2) / D``, ``v = (y - H/2) / D`` (level-0 pixels, ``D`` the
slide diagonal): a plane (lamp gradient) plus an isotropic paraboloid with a free centre
(radial vignetting about the optical axis). The four coefficients are fitted by trimmed least
squares to the mean log intensity of glass blocks (``block_px`` squares of a 1024-px reduced
image that are at least 60 % bright, unsaturated pixels farther than ``glass_margin_um`` from
tissue). The correction multiplies every pixel by ``L_min / L(x, y)``: the field is brought
down to its dimmest level over the slide, so nothing saturates, and the background estimated
afterwards is that of an evenly lit slide. Because ``u`` and ``v`` are slide coordinates and
the factor separates into a row and a column term, a tile is corrected exactly as the same
pixels of the whole slide (results do not depend on the tiling).

The correction is applied (``FlatField.applied``) only when the glass *determines* the field
over the tissue; otherwise the slide is left as it is and the reason is recorded:

* fewer than ``min_glass_blocks`` glass blocks (a field inside the tissue);
* the fitted field varies by less than ``min_range_log10`` over the slide (already flat:
  changing nothing keeps results stable);
* it varies by more than ``max_range_log10`` (not illumination: e.g. a stained mountant);
* the glass scatters around the fit by more than ``max_residual_log10``, or the field's
  variation is less than ``min_snr`` times that scatter (the "glass" is pale tissue or
  mountant, or the model does not describe this slide's lighting);
* the fit's standard error at some tissue block exceeds ``max_se_log10`` (the tissue lies
  far from any glass, and the fit would extrapolate). The error uses the glass scatter, but
  at least ``residual_floor_log10``, so a perfect fit on one strip of glass is not trusted
  across the slide.

Scanners correct each camera field before stitching, so a whole-slide image is usually flat
and the correction stays off ("flat"); it matters for camera images of single fields.

**Blank-field reference.** Camera images can also be corrected with a picture of empty glass
taken with the same microscope, objective, lamp and camera settings
(``IlluminationParams.reference``: its path). It must have the image's shape. It is smoothed
(Gaussian, ``reference_smoothing_pct`` of its diagonal, which removes dust and noise) and each
pixel and channel is multiplied by ``B_min / B(x, y)`` (per channel: a lamp whose colour
changes across the field is corrected too). This handles any shape of illumination — strong
cos⁴ vignetting, elliptical or off-axis fields, seams — that the fitted model refuses. The
reference's SHA-256 is recorded next to the results.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from numba import njit

from ._batch_io import file_sha256
from .errors import InputError

__all__ = ["IlluminationParams", "FlatField", "fit_flat_field", "reference_flat_field"]

#: the fit works on an image reduced to at most this many pixels along its longer side
FIT_PX = 1024


@dataclass(frozen=True)
class IlluminationParams:
    """Parameters of the flat-field correction (:func:`fit_flat_field`).

    Attributes
    ----------
    flat_field : {"auto", "off"}
        ``"auto"``: fit the illumination on the glass and correct it when the rules of the
        module docstring pass; ``"off"``: never correct.
    block_px : int
        Edge of a glass block in pixels of the image reduced to 1024 px along its longer
        side (smaller images use proportionally smaller blocks, at least 2 px).
    glass_margin_um : float
        Glass pixels closer than this to tissue are not used (blur halo, mountant meniscus).
    min_glass_blocks : int
        Fewer usable glass blocks than this: no correction ("too little glass").
    min_range_log10 : float
        Smallest variation of the fitted field over the slide (log10 intensity; 0.01 ≈ 2.3 %)
        that is corrected.
    max_range_log10 : float
        Largest plausible variation (0.15 ≈ 41 %); above it the slide is left alone.
    max_residual_log10 : float
        Largest robust scatter (1.4826 × MAD) of the glass blocks around the fit.
    min_snr : float
        Smallest ratio of the field's variation to that scatter.
    max_se_log10 : float
        Largest standard error of the fitted field at any tissue block (0.004 ≈ 0.9 %).
    residual_floor_log10 : float
        Scatter assumed at least, for the standard error (0.002 ≈ 0.5 %).
    reference : str
        Path of a blank-field image (empty glass, same microscope and camera settings, same
        shape as the images); when set it is used instead of the fit ("" = fit on the glass).
    reference_smoothing_pct : float
        Gaussian smoothing of the reference, in % of its diagonal.
    """

    flat_field: str = "auto"
    block_px: int = 16
    glass_margin_um: float = 20.0
    min_glass_blocks: int = 12
    min_range_log10: float = 0.01
    max_range_log10: float = 0.15
    max_residual_log10: float = 0.005
    min_snr: float = 10.0
    max_se_log10: float = 0.004
    residual_floor_log10: float = 0.002
    reference: str = ""
    reference_smoothing_pct: float = 1.0

    def __post_init__(self) -> None:
        if self.flat_field not in ("auto", "off"):
            raise InputError(f"illumination.flat_field must be 'auto' or 'off', "
                             f"got {self.flat_field!r}")
        if self.block_px < 2:
            raise InputError(f"illumination.block_px must be at least 2, got {self.block_px}")
        for name in ("glass_margin_um", "min_range_log10", "max_range_log10",
                     "max_residual_log10", "max_se_log10", "residual_floor_log10", "min_snr",
                     "reference_smoothing_pct"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise InputError(f"illumination.{name} must be a number >= 0, got {v!r}")


@dataclass(frozen=True)
class FlatField:
    """A fitted illumination field of one slide, and whether it is corrected.

    Attributes
    ----------
    shape : (int, int)
        Level-0 (rows, columns) of the slide the coordinates refer to.
    coef : (float, float, float, float)
        ``k, a, b, c`` of ``log10 L = k + a·u + b·v + c·(u² + v²)`` (see the module).
    applied : bool
        True when :meth:`apply` changes pixels.
    reason : str
        Why it is (not) applied.
    n_glass_blocks : int
        Glass blocks used by the fit (after trimming) of ``n_glass_candidates``.
    residual_log10, se_max_log10, range_log10 : float
        Robust glass scatter around the fit, largest standard error over tissue, variation of
        the field over the slide (log10 intensity; NaN when not fitted).
    """

    shape: tuple[int, int]
    coef: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    applied: bool = False
    reason: str = "off"
    n_glass_blocks: int = 0
    n_glass_candidates: int = 0
    residual_log10: float = float("nan")
    se_max_log10: float = float("nan")
    range_log10: float = float("nan")
    reference: str = ""
    reference_sha256: str = ""
    reference_smoothing_pct: float = 1.0

    # ------------------------------------------------------------------ geometry
    def _terms(self, start: int, stop: int, axis: int, scale: float = 1.0) -> np.ndarray:
        """``a·u + c·u²`` (axis 1, columns) or ``b·v + c·v²`` (axis 0, rows) at the centres of
        pixels ``start..stop`` of an image with ``scale`` level-0 px per pixel."""
        h, w = self.shape
        d = math.hypot(h, w)
        n = w if axis == 1 else h
        t = ((np.arange(start, stop, dtype=np.float64) + 0.5) * scale - n / 2) / d
        lin = self.coef[1] if axis == 1 else self.coef[2]
        return lin * t + self.coef[3] * t * t

    def factors(self, box: tuple[int, int, int, int], scale: tuple[float, float] = (1.0, 1.0)
                ) -> tuple[np.ndarray, np.ndarray]:
        """Row and column factors (float32) of ``box`` = (x0, y0, x1, y1).

        ``box`` is in pixels of an image with ``scale`` = (row, column) level-0 px per pixel
        (1, 1: level 0). The corrected pixel is ``rgb[y, x] * fy[y - y0] * fx[x - x0]``
        (each factor ≤ 1)."""
        x0, y0, x1, y1 = box
        gx = self._terms(x0, x1, 1, float(scale[1]))
        gy = self._terms(y0, y1, 0, float(scale[0]))
        # split the offset between the axes so both factors stay <= 1
        ox, oy = self._axis_minima()
        fx = np.power(10.0, -(gx - ox)).astype(np.float32)
        fy = np.power(10.0, -(gy - oy)).astype(np.float32)
        return fy, fx

    def _axis_minima(self) -> tuple[float, float]:
        h, w = self.shape
        return (float(_quad_min(self.coef[1], self.coef[3], w, math.hypot(h, w))),
                float(_quad_min(self.coef[2], self.coef[3], h, math.hypot(h, w))))

    def apply(self, rgb: np.ndarray, *, origin: tuple[int, int] = (0, 0),
              scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
        """Corrected copy of ``rgb`` (uint8 RGB); ``rgb`` itself when the field is not applied.

        ``rgb``'s top-left pixel is pixel ``origin`` (x, y) of an image with ``scale`` =
        (row, column) level-0 px per pixel: a level-0 region by default, e.g. the whole
        thumbnail with ``scale`` = its downsampling."""
        if not self.applied:
            return rgb
        rgb = np.ascontiguousarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"flat-field correction needs uint8 RGB (H, W, 3), got "
                             f"{rgb.dtype} {rgb.shape}")
        x0, y0 = int(origin[0]), int(origin[1])
        h, w = rgb.shape[:2]
        out = np.empty_like(rgb)
        if self.reference:
            fmap = _reference_factors(self.reference, self.reference_sha256,
                                      self.reference_smoothing_pct, self.shape)
            if tuple(map(float, scale)) != (1.0, 1.0):
                ys = np.minimum(((np.arange(y0, y0 + h) + 0.5) * scale[0]).astype(np.int64),
                                self.shape[0] - 1)
                xs = np.minimum(((np.arange(x0, x0 + w) + 0.5) * scale[1]).astype(np.int64),
                                self.shape[1] - 1)
                part = np.ascontiguousarray(fmap[ys][:, xs])
            else:
                part = np.ascontiguousarray(fmap[y0:y0 + h, x0:x0 + w])
            if part.shape[:2] != (h, w):
                raise InputError(f"flat-field reference {self.reference}: region x={x0} y={y0} "
                                 f"{w}x{h} lies outside its {self.shape[1]}x{self.shape[0]} px")
            _apply_map_kernel(rgb, part, out)
            return out
        fy, fx = self.factors((x0, y0, x0 + w, y0 + h), scale)
        _apply_kernel(rgb, fy, fx, out)
        return out

    def max_correction_pct(self) -> float:
        """Largest darkening applied to a pixel, in % of its intensity (0 when not applied)."""
        if not self.applied or not math.isfinite(self.range_log10):
            return 0.0
        return float((1 - 10 ** (-self.range_log10)) * 100)

    # ------------------------------------------------------------------ records
    def to_dict(self) -> dict:
        """JSON-able record (provenance)."""
        d = asdict(self)
        d["shape"] = [int(s) for s in self.shape]
        d["coef"] = [float(c) for c in self.coef]
        d["model"] = ("blank-field reference image" if self.reference else
                      "log10 L = k + a*u + b*v + c*(u^2+v^2), u=(x-W/2)/D, v=(y-H/2)/D")
        d["max_correction_pct"] = round(self.max_correction_pct(), 3)
        for k in ("residual_log10", "se_max_log10", "range_log10"):
            d[k] = None if not math.isfinite(d[k]) else float(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict | None, shape: tuple[int, int] | None = None) -> FlatField:
        """Inverse of :meth:`to_dict` (None: an identity field of ``shape``)."""
        if d is None:
            return cls(shape=tuple(shape or (1, 1)))
        nan = float("nan")
        return cls(shape=tuple(int(s) for s in d["shape"]),
                   coef=tuple(float(c) for c in d["coef"]), applied=bool(d["applied"]),
                   reason=str(d["reason"]), n_glass_blocks=int(d.get("n_glass_blocks", 0)),
                   n_glass_candidates=int(d.get("n_glass_candidates", 0)),
                   residual_log10=nan if d.get("residual_log10") is None else d["residual_log10"],
                   se_max_log10=nan if d.get("se_max_log10") is None else d["se_max_log10"],
                   range_log10=nan if d.get("range_log10") is None else d["range_log10"],
                   reference=str(d.get("reference", "")),
                   reference_sha256=str(d.get("reference_sha256", "")),
                   reference_smoothing_pct=float(d.get("reference_smoothing_pct", 1.0)))


def _quad_min(lin: float, quad: float, n: int, d: float) -> float:
    """Minimum of ``lin·t + quad·t²`` over the pixel centres ``t = (i + 0.5 - n/2) / d``."""
    ends = [(0.5 - n / 2) / d, (n - 0.5 - n / 2) / d]
    cand = [lin * t + quad * t * t for t in ends]
    if quad > 0:
        t = -lin / (2 * quad)
        if ends[0] <= t <= ends[1]:
            cand.append(lin * t + quad * t * t)
    return min(cand)


@njit(cache=True, nogil=True)
def _apply_kernel(rgb, fy, fx, out):  # pragma: no cover - compiled
    h, w = rgb.shape[0], rgb.shape[1]
    for y in range(h):
        f0 = fy[y]
        for x in range(w):
            f = f0 * fx[x]
            for c in range(3):
                v = np.float32(rgb[y, x, c]) * f + np.float32(0.5)
                out[y, x, c] = np.uint8(min(v, np.float32(255.0)))


@njit(cache=True, nogil=True)
def _apply_map_kernel(rgb, fmap, out):  # pragma: no cover - compiled
    h, w = rgb.shape[0], rgb.shape[1]
    for y in range(h):
        for x in range(w):
            for c in range(3):
                v = np.float32(rgb[y, x, c]) * fmap[y, x, c] + np.float32(0.5)
                out[y, x, c] = np.uint8(min(v, np.float32(255.0)))


#: per-process cache of reference factor maps: (path, sha256, smoothing) -> float32 (H, W, 3)
_REFERENCE_CACHE: dict[tuple, np.ndarray] = {}


def _reference_factors(path: str, sha256: str, smoothing_pct: float,
                       shape: tuple[int, int], *, verify: bool = True) -> np.ndarray:
    """Factor map ``B_min / B`` (float32, (H, W, 3), each ≤ 1) of a blank-field image.

    ``verify``: check the file still has ``sha256`` before loading it (off when the caller
    has just computed it)."""
    key = (path, sha256, float(smoothing_pct))
    fmap = _REFERENCE_CACHE.get(key)
    if fmap is not None:
        return fmap
    from .slide import open_slide

    if verify and sha256 and file_sha256(path) != sha256:
        raise InputError(f"flat-field reference {path} changed since the slide was prepared "
                         "(SHA-256 differs)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_slide(path) as ref:
            blank = np.asarray(ref.read_level(0))[..., :3]
    if blank.shape[:2] != tuple(shape):
        raise InputError(f"flat-field reference {path} is {blank.shape[1]}x{blank.shape[0]} px "
                         f"but the image is {shape[1]}x{shape[0]} px; take the blank with the "
                         "same camera settings (same size)")
    b = blank.astype(np.float32)
    sigma = float(smoothing_pct) / 100 * math.hypot(*shape)
    if sigma > 0.3:
        b = cv2.GaussianBlur(b, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    b = np.maximum(b, 1.0)
    dark = b.reshape(-1, 3).mean(axis=0) < 100
    if dark.any():
        raise InputError(f"flat-field reference {path} is not an image of empty glass (mean "
                         f"intensity below 100 in channel(s) {np.flatnonzero(dark).tolist()})")
    fmap = (b.reshape(-1, 3).min(axis=0) / b).astype(np.float32)
    if len(_REFERENCE_CACHE) >= 2:
        _REFERENCE_CACHE.clear()
    _REFERENCE_CACHE[key] = fmap
    return fmap


def reference_flat_field(path: str, *, shape: tuple[int, int],
                         params: IlluminationParams | None = None) -> FlatField:
    """Flat field of a blank-field reference image (see the module docstring).

    Parameters
    ----------
    path : str
        The blank image (any format :func:`biopsyquant.slide.open_slide` reads).
    shape : (int, int)
        Level-0 (rows, columns) of the image to correct; the reference must have it.
    params : IlluminationParams, optional
        ``reference_smoothing_pct`` is used.

    Raises
    ------
    InputError
        The file cannot be read, has another shape, or is not an image of empty glass.
    """
    params = params or IlluminationParams()
    path = str(path)
    try:
        sha = file_sha256(path)
    except OSError as exc:
        raise InputError(f"flat-field reference {path}: cannot read it ({exc.strerror or exc})"
                         ) from None
    fmap = _reference_factors(path, sha, params.reference_smoothing_pct, tuple(shape),
                              verify=False)
    rng = float(np.log10(1.0 / float(fmap.min())))
    return FlatField(shape=(int(shape[0]), int(shape[1])), applied=True,
                     reason=f"corrected with the blank-field reference {path}",
                     range_log10=rng, reference=path, reference_sha256=sha,
                     reference_smoothing_pct=float(params.reference_smoothing_pct))


def identity(shape: tuple[int, int], reason: str) -> FlatField:
    """A field that changes nothing, with the reason recorded."""
    return FlatField(shape=(int(shape[0]), int(shape[1])), reason=reason)


def fit_flat_field(
    rgb: np.ndarray,
    *,
    mpp: float,
    params: IlluminationParams | None = None,
    shape: tuple[int, int] | None = None,
    tissue_params=None,
) -> FlatField:
    """Fit the illumination of a slide on its glass (see the module docstring).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (h, w, 3)
        The slide, or a thumbnail of it covering the whole slide.
    mpp : float
        µm per pixel **of ``rgb``** (a thumbnail's, not level 0's).
    params : IlluminationParams, optional
    shape : (int, int), optional
        Level-0 (rows, columns) of the slide (default: ``rgb``'s shape): the field is
        expressed in level-0 coordinates so that tiles can be corrected.
    tissue_params : TissueParams, optional
        Settings of the tissue detection that separates glass from tissue.

    Returns
    -------
    FlatField
        ``applied`` tells whether it corrects anything; ``reason`` why (not).
    """
    from .stains import estimate_background
    from .tissue import TissueParams, detect_tissue

    params = params or IlluminationParams()
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise InputError(f"flat-field fit needs uint8 RGB (H, W, 3), got {rgb.dtype} {rgb.shape}")
    rgb = rgb[..., :3]
    full = tuple(int(s) for s in (shape or rgb.shape[:2]))
    if params.flat_field == "off":
        return identity(full, "off (illumination.flat_field)")
    if params.reference:
        return reference_flat_field(params.reference, shape=full, params=params)
    h, w = rgb.shape[:2]
    f = max(1, math.ceil(max(h, w) / FIT_PX))
    small = rgb if f == 1 else cv2.resize(rgb, (max(1, w // f), max(1, h // f)),
                                          interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    smpp = float(mpp) * w / sw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bg = estimate_background(small)
        tis = detect_tissue(small, mpp=smpp, background=bg,
                            params=tissue_params or TissueParams())
    p = small.astype(np.int16)
    mx, mn = p.max(axis=2), p.min(axis=2)
    cand = (p.sum(axis=2) >= 3 * 150) & ((mx - mn) <= 0.15 * np.maximum(mx, 1)) & ~tis
    r = int(math.ceil(params.glass_margin_um / smpp))
    if r > 0 and tis.any():
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        cand &= cv2.dilate(tis.astype(np.uint8), k) == 0
    # blocks keep the same share of the slide whatever the image size (a ~64 x 64 grid)
    b = max(2, int(round(params.block_px * max(sh, sw) / FIT_PX)))
    ny, nx = sh // b, sw // b
    if ny < 2 or nx < 2:
        return identity(full, f"image too small for a flat-field fit ({sh}x{sw} px reduced)")
    lg = np.log10(np.maximum(small[:ny * b, :nx * b].astype(np.float32), 1.0)).mean(axis=2)
    c = cand[:ny * b, :nx * b]
    cs = c.reshape(ny, b, nx, b).sum(axis=(1, 3))
    ls = np.where(c, lg, 0).reshape(ny, b, nx, b).sum(axis=(1, 3))
    ok = cs >= 0.6 * b * b
    n_cand = int(ok.sum())
    if n_cand < params.min_glass_blocks:
        return identity(full, f"too little glass ({n_cand} glass blocks < "
                              f"{params.min_glass_blocks})")
    # block centres in level-0 coordinates, normalised by the slide diagonal
    H, W = full
    d = math.hypot(H, W)
    sy, sx = H / sh, W / sw
    yy, xx = np.mgrid[0:ny, 0:nx]
    u = (((xx + 0.5) * b) * sx - W / 2) / d
    v = (((yy + 0.5) * b) * sy - H / 2) / d

    def design(m: np.ndarray) -> np.ndarray:
        return np.stack([np.ones(int(m.sum())), u[m], v[m], u[m] ** 2 + v[m] ** 2], axis=1)

    X = design(ok)
    g = (ls[ok] / cs[ok]).astype(np.float64)
    keep = np.ones(g.size, bool)
    coef = np.zeros(4)
    for _ in range(5):
        if keep.sum() < params.min_glass_blocks:
            break
        coef, *_ = np.linalg.lstsq(X[keep], g[keep], rcond=None)
        res = g - X @ coef
        rk = res[keep]
        s = 1.4826 * float(np.median(np.abs(rk - np.median(rk))))
        new = np.abs(res) <= max(3.0 * s, 1e-4)
        if np.array_equal(new, keep):
            break
        keep = new
    n_used = int(keep.sum())
    res = g - X @ coef
    scatter = 1.4826 * float(np.median(np.abs(res[keep] - np.median(res[keep]))))
    xtx = X[keep].T @ X[keep]
    rank = np.linalg.matrix_rank(xtx)
    tb = tis[:ny * b, :nx * b].reshape(ny, b, nx, b).mean(axis=(1, 3)) > 0.5
    if rank < 4 or not tb.any():
        se_max = float("inf") if rank < 4 else 0.0
    else:
        cov = max(scatter, params.residual_floor_log10) ** 2 * np.linalg.inv(xtx)
        Xt = design(tb)
        se_max = float(np.sqrt(np.einsum("ij,jk,ik->i", Xt, cov, Xt)).max())
    # variation of the field over the slide's pixel centres (it separates into x and y terms)
    rng = float(_quad_max(coef[1], coef[3], W, d) - _quad_min(coef[1], coef[3], W, d)
                + _quad_max(coef[2], coef[3], H, d) - _quad_min(coef[2], coef[3], H, d))
    if n_used < params.min_glass_blocks:
        reason, apply = f"too little consistent glass ({n_used} blocks after trimming)", False
    elif scatter > params.max_residual_log10:
        reason, apply = (f"glass does not follow a smooth field (scatter {scatter:.4f} > "
                         f"{params.max_residual_log10} log10)"), False
    elif rng < params.min_range_log10:
        reason, apply = (f"flat (field varies {rng:.4f} < {params.min_range_log10} log10 "
                         "over the slide)"), False
    elif rng < params.min_snr * scatter:
        reason, apply = (f"field ({rng:.4f} log10) not clearly above the glass's own "
                         f"unevenness ({scatter:.4f}; needs {params.min_snr:g}x)"), False
    elif rng > params.max_range_log10:
        reason, apply = (f"implausible field (varies {rng:.4f} > {params.max_range_log10} "
                         "log10); left uncorrected"), False
    elif se_max > params.max_se_log10:
        reason, apply = (f"glass does not surround the tissue (standard error "
                         f"{se_max:.4f} > {params.max_se_log10} log10 over tissue)"), False
    else:
        reason, apply = (f"corrected: field varies {rng:.4f} log10 "
                         f"({(10 ** rng - 1) * 100:.1f} %) over the slide"), True
    return FlatField(shape=full, coef=tuple(float(x) for x in coef), applied=apply, reason=reason,
                     n_glass_blocks=n_used, n_glass_candidates=n_cand,
                     residual_log10=scatter, se_max_log10=se_max, range_log10=rng)


def _quad_max(lin: float, quad: float, n: int, d: float) -> float:
    """Maximum of ``lin·t + quad·t²`` over the pixel centres (see :func:`_quad_min`)."""
    return -_quad_min(-lin, -quad, n, d)
