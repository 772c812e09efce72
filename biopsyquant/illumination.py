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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from numba import njit

from .errors import InputError

__all__ = ["IlluminationParams", "FlatField", "fit_flat_field"]

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

    def __post_init__(self) -> None:
        if self.flat_field not in ("auto", "off"):
            raise InputError(f"illumination.flat_field must be 'auto' or 'off', "
                             f"got {self.flat_field!r}")
        if self.block_px < 2:
            raise InputError(f"illumination.block_px must be at least 2, got {self.block_px}")
        for name in ("glass_margin_um", "min_range_log10", "max_range_log10",
                     "max_residual_log10", "max_se_log10", "residual_floor_log10", "min_snr"):
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
        fy, fx = self.factors((x0, y0, x0 + w, y0 + h), scale)
        out = np.empty_like(rgb)
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
        d["model"] = "log10 L = k + a*u + b*v + c*(u^2+v^2), u=(x-W/2)/D, v=(y-H/2)/D"
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
                   range_log10=nan if d.get("range_log10") is None else d["range_log10"])


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
    ff = FlatField(shape=full, coef=tuple(float(x) for x in coef), applied=False, reason="",
                   n_glass_blocks=n_used, n_glass_candidates=n_cand, residual_log10=scatter,
                   se_max_log10=se_max)
    ox, oy = ff._axis_minima()
    rng = float(_quad_max(coef[1], coef[3], W, d) + _quad_max(coef[2], coef[3], H, d) - ox - oy)
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
    return FlatField(shape=full, coef=ff.coef, applied=apply, reason=reason,
                     n_glass_blocks=n_used, n_glass_candidates=n_cand,
                     residual_log10=scatter, se_max_log10=se_max, range_log10=rng)


def _quad_max(lin: float, quad: float, n: int, d: float) -> float:
    """Maximum of ``lin·t + quad·t²`` over the pixel centres (see :func:`_quad_min`)."""
    return -_quad_min(-lin, -quad, n, d)
