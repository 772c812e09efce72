"""Colour deconvolution of brightfield IHC (Ruifrok & Johnston 2001).

Optical density (OD) is always in **log10 units relative to the slide's own background**
(glass) intensity ``I0`` per RGB channel: ``OD_c = -log10(I_c / I0_c)``, clipped at 0.
Stain concentrations are the OD unmixed by the inverse of the stain matrix, also in log10 OD
units.  (Note: ``skimage.color.rgb2hed`` returns natural-log OD with a fixed white background,
not comparable to these numbers.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

__all__ = [
    "StainModel",
    "PRESETS",
    "preset",
    "optical_density",
    "deconvolve",
    "stain_od",
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
        third = np.cross(vectors[0], vectors[1])
        third = np.abs(third)  # keep it in the positive OD octant like QuPath's residual
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


def deconvolve(rgb: np.ndarray, model: StainModel) -> np.ndarray:
    """Unmix an RGB image into stain concentrations (log10 OD units).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    model : StainModel

    Returns
    -------
    ndarray of float32, shape (H, W, 3)
        Concentration of each stain of ``model.names``, in OD (log10) units.
    """
    rgb = _check_rgb(rgb)
    luts = _od_luts(model.background)  # (3, 256)
    inv = model.inverse  # (3 channels, 3 stains)
    out = np.empty(rgb.shape, np.float32)
    for s in range(3):
        pre = (luts * inv[:, s][:, None]).astype(np.float32)  # channel c -> contribution to s
        o = out[..., s]
        np.take(pre[0], rgb[..., 0], out=o)
        o += np.take(pre[1], rgb[..., 1])
        o += np.take(pre[2], rgb[..., 2])
    return out


def stain_od(rgb: np.ndarray, model: StainModel, stain: str = "dab") -> np.ndarray:
    """Concentration of one stain (log10 OD units), float32 (H, W)."""
    rgb = _check_rgb(rgb)
    s = model.index(stain)
    luts = _od_luts(model.background)
    pre = (luts * model.inverse[:, s][:, None]).astype(np.float32)
    out = np.take(pre[0], rgb[..., 0])
    out += np.take(pre[1], rgb[..., 1])
    out += np.take(pre[2], rgb[..., 2])
    return out
