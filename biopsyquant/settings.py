"""Analysis settings: one frozen :class:`Settings` object per analysis.

Settings are built from (later wins):

1. the defaults of each step's parameter dataclass (``TissueParams`` in :mod:`biopsyquant.tissue`,
   ``FiberParams`` in :mod:`biopsyquant.fibers`, ...);
2. the marker preset ``biopsyquant/presets/<marker>.toml``;
3. a user TOML file (``--settings FILE.toml``);
4. ``key=value`` overrides (``--set cells.dab_threshold_1_od=0.25``).

Every key is validated: an unknown section or key, or a value of the wrong type, raises
:class:`~biopsyquant.errors.SettingsError` naming the key, its origin and the valid choices.
The settings are stored in every result (:meth:`Settings.to_dict`) and identified by
:meth:`Settings.digest`, so that a result can be reproduced and a batch re-run can skip slides
already scored with the same settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SettingsError

__all__ = [
    "ScoringParams",
    "StainParams",
    "TileParams",
    "Settings",
    "MARKERS",
    "canonical_marker",
    "load_settings",
    "parse_overrides",
]

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass(frozen=True)
class StainParams:
    """How the stain model of a slide is obtained.

    Attributes
    ----------
    preset : str
        Base stain vectors: ``"H-DAB"``, ``"H-E"`` or ``"H-E-DAB"``.
    estimate : bool
        Estimate vectors per slide (Macenko-style on tissue pixels); the preset is the
        fallback when estimation fails, and the reason is recorded.
    vectors : tuple
        User stain vectors (rows R, G, B OD) overriding the preset; empty = use the preset.
    background : tuple
        User background intensity (R, G, B, 0-255); empty = estimate from glass pixels.
    confident_od : float
        Each stain's direction is estimated only from its confidently stained pixels (total
        OD ≥ this, log10); pale pixels carry camera noise and JPEG colour artefacts
        (``stains.estimate_stains``).
    min_confident_pixels : int
        Fewer confident DAB pixels than this: the DAB vector stays at the preset (hematoxylin
        is still estimated) and the model's ``source`` says so.
    """

    preset: str = "H-DAB"
    estimate: bool = True
    vectors: tuple = ()
    background: tuple = ()
    confident_od: float = 0.5
    min_confident_pixels: int = 100


@dataclass(frozen=True)
class TileParams:
    """Tiling of large images.

    Attributes
    ----------
    tile_size_px : int
        Edge of the core of a tile, in level-0 pixels.
    overlap_um : float
        Context added on every side of a tile's core (µm); must exceed the largest object
        (fiber) so that every object lies whole in the tile that owns its centroid. 150 µm:
        half the largest fiber (75 µm) plus the reach of the widest local statistic (the
        50 µm fiber-level window); whole-vs-tiled summaries are identical at 100, 150 and
        200 µm (docs/_parts/tile-speed-performance.md, ``benchmarks/study_overlap.py``).
    max_whole_image_px : int
        Slides up to this many pixels are scored in one piece by the batch runner and the
        plugin; larger ones in tiles (16 Mpx keeps a worker's peak memory near 1 GB).
    assumed_mpp_unknown : float
        Pixel size (µm/px) assumed *only for object-size parameters* when the true pixel size
        is unknown; physical outputs (µm, mm², per mm²) are then reported as missing.
    max_tile_read_px : int
        Largest region (core + overlap on both sides, in level-0 pixels) a tile reads: the
        core is made smaller when ``tile_size_px`` plus the overlap would exceed it (e.g. at
        0.25 µm/px the 150 µm overlap is 600 px, and a 2048 core would read 10.5 Mpx). This is
        what bounds a worker's memory (about 45 bytes per pixel read, plus ~0.35 GB of code)
        whatever the pixel size. 0 = no cap.
    """

    tile_size_px: int = 2048
    overlap_um: float = 150.0
    max_whole_image_px: int = 16_000_000
    assumed_mpp_unknown: float = 0.5
    max_tile_read_px: int = 8_400_000


@dataclass(frozen=True)
class ScoringParams:
    """Which steps run besides the marker's analysis.

    Attributes
    ----------
    segment_fibers : bool
        Segment muscle fibers and map compartments (needed for per-fiber, per-compartment and
        fibers-vs-interstitium numbers). Off for non-muscle tissue (e.g. the Ki67 preset).
    """

    segment_fibers: bool = True


#: section name -> (module, class name) of its parameter dataclass
SECTIONS: dict[str, tuple[str, str]] = {
    "scoring": ("biopsyquant.settings", "ScoringParams"),
    "stains": ("biopsyquant.settings", "StainParams"),
    "illumination": ("biopsyquant.illumination", "IlluminationParams"),
    "tissue": ("biopsyquant.tissue", "TissueParams"),
    "fibers": ("biopsyquant.fibers", "FiberParams"),
    "compartments": ("biopsyquant.compartments", "CompartmentParams"),
    "cells": ("biopsyquant.cells", "CellParams"),
    "mhc": ("biopsyquant.mhc", "MhcParams"),
    "pixels": ("biopsyquant.pixels", "PixelParams"),
    "tiling": ("biopsyquant.settings", "TileParams"),
}

#: canonical marker name -> accepted spellings (compared case-insensitively, without spaces)
MARKERS: dict[str, tuple[str, ...]] = {
    "CD163": ("cd163",),
    "Ki67": ("ki67", "ki-67", "mib1", "nuclear"),
    "MHC-I": ("mhc-i", "mhci", "mhc1", "mhc-1", "mhcclassi", "hla-abc", "hlaabc"),
    "IL-1a": ("il-1a", "il1a", "il-1α", "il1α", "il-1alpha", "il1alpha"),
    "IL-1b": ("il-1b", "il1b", "il-1β", "il1β", "il-1beta", "il1beta"),
    "IL-1Ra": ("il-1ra", "il1ra", "il-1rn", "il1rn"),
}


def canonical_marker(marker: str) -> str:
    """Return the canonical preset name of ``marker`` (e.g. ``"il1b"`` -> ``"IL-1b"``)."""
    key = str(marker).strip().lower().replace(" ", "").replace("_", "-")
    for name, aliases in MARKERS.items():
        if key == name.lower() or key in aliases or key.replace("-", "") in {
            a.replace("-", "") for a in aliases
        }:
            return name
    # a user preset file in the preset folder also counts
    if (PRESET_DIR / f"{marker}.toml").is_file():
        return str(marker)
    raise SettingsError(
        f"unknown marker {marker!r}; choose one of {', '.join(MARKERS)} "
        "(or give a settings file with an 'analysis' key)"
    )


def _param_class(section: str):
    mod, cls = SECTIONS[section]
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ModuleNotFoundError, AttributeError):  # step not available in this build
        return None


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Coerce a TOML value to the type of the dataclass default."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise SettingsError(f"{where}: expected true/false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool):
            raise SettingsError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise SettingsError(f"{where}: expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple):
            raise SettingsError(f"{where}: expected a list, got {value!r}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise SettingsError(f"{where}: expected a string, got {value!r}")
        return value
    if default is None:
        return value
    return value


def _apply(obj: Any, updates: Mapping[str, Any], section: str, origin: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(obj) if not f.name.startswith("_")}
    changes = {}
    for key, value in updates.items():
        if key not in names:
            raise SettingsError(
                f"{origin}: unknown setting '{section}.{key}'; valid keys of [{section}] are "
                f"{', '.join(sorted(names))}"
            )
        default = getattr(obj, key)
        changes[key] = _coerce(value, default, f"{origin}: setting '{section}.{key}'")
    try:
        return dataclasses.replace(obj, **changes)
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"{origin}: invalid [{section}] settings: {exc}") from None


@dataclass(frozen=True)
class Settings:
    """All parameters of one analysis (frozen; stored with every result).

    Attributes
    ----------
    marker : str
        Canonical marker name (``"CD163"``, ``"MHC-I"``, ``"IL-1b"`` ...).
    analysis : str
        Scoring kind of the marker: ``"cells"``, ``"mhc"`` or ``"pixels"``.
    sections : dict
        Section name -> frozen parameter dataclass (``settings.cells`` etc. also work).
    origin : tuple of str
        Where the values came from (preset file, user file, overrides), for provenance.
    """

    marker: str
    analysis: str
    sections: Mapping[str, Any] = field(default_factory=dict)
    origin: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        sections = object.__getattribute__(self, "sections")
        if name in sections:
            return sections[name]
        raise AttributeError(f"Settings has no section or attribute {name!r}")

    def get(self, key: str) -> Any:
        """Value of a dotted key, e.g. ``settings.get("cells.dab_threshold_1_od")``."""
        section, _, name = key.partition(".")
        try:
            return getattr(self.sections[section], name)
        except (KeyError, AttributeError):
            raise SettingsError(f"unknown setting {key!r}") from None

    def to_dict(self) -> dict:
        """Nested plain dict (JSON/TOML serialisable)."""
        out: dict[str, Any] = {"marker": self.marker, "analysis": self.analysis}
        for name, params in self.sections.items():
            d = dataclasses.asdict(params)
            out[name] = {k: _jsonable(v) for k, v in d.items() if not k.startswith("_")}
        return out

    def digest(self) -> str:
        """SHA-256 (hex, 16 chars) of the canonical JSON of :meth:`to_dict`."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, overrides: Mapping[str, Any] | Iterable[str], origin: str = "overrides"
                ) -> Settings:
        """Copy with dotted-key overrides applied (same validation as :func:`load_settings`)."""
        sections = dict(self.sections)
        for section, values in _group_overrides(overrides, origin).items():
            if section not in sections:
                raise SettingsError(
                    f"{origin}: unknown settings section '{section}'; valid sections are "
                    f"{', '.join(sorted(sections))}"
                )
            sections[section] = _apply(sections[section], values, section, origin)
        return Settings(self.marker, self.analysis, sections, self.origin + (origin,))

    def to_toml(self) -> str:
        """TOML text that :func:`load_settings` reads back to equal settings."""
        import tomli_w

        d = self.to_dict()
        d.pop("marker")
        # TOML has no null: a None value is the dataclass default, so leaving it out round-trips
        d = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
             for k, v in d.items()}
        return f'# biopsyquant settings for marker {self.marker}\nmarker = "{self.marker}"\n' + \
            tomli_w.dumps(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Settings:
        """Inverse of :meth:`to_dict` (validated)."""
        d = dict(d)
        marker = d.pop("marker")
        return load_settings(marker, overrides=_flatten(d), _origin="dict")


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def _flatten(d: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            for kk, vv in v.items():
                out[f"{k}.{kk}"] = vv
        else:
            out[k] = v
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``["cells.min_area_um2=20", "stains.estimate=false"]`` into a dict.

    Values are read as TOML values (numbers, booleans, lists, quoted strings); anything else
    is taken as a bare string.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or "." not in key and key != "analysis":
            raise SettingsError(
                f"override {item!r} must look like section.key=value, e.g. cells.min_area_um2=20"
            )
        raw = raw.strip()
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def _group_overrides(overrides: Mapping[str, Any] | Iterable[str] | None, origin: str
                     ) -> dict[str, dict[str, Any]]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, dot, name = str(key).partition(".")
        if not dot:
            if key in {"analysis", "marker"}:
                continue
            raise SettingsError(f"{origin}: setting {key!r} must be section.key")
        grouped.setdefault(section, {})[name] = value
    return grouped


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"{path}: settings file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read settings file: {exc}") from None


def load_settings(
    marker: str,
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    *,
    _origin: str = "overrides",
) -> Settings:
    """Build the settings of ``marker`` from its preset, a user file and overrides.

    Parameters
    ----------
    marker : str
        Marker preset (``"CD163"``, ``"Ki67"``, ``"MHC-I"``, ``"IL-1a"``, ``"IL-1b"``,
        ``"IL-1Ra"``; common spellings accepted).
    path : str or Path, optional
        User TOML file with ``[section]`` tables overriding the preset.
    overrides : mapping or iterable of "key=value", optional
        Dotted-key overrides, applied last.

    Returns
    -------
    Settings

    Raises
    ------
    SettingsError
        Unknown marker, section or key, or a value of the wrong type.
    """
    name = canonical_marker(marker)
    preset_path = PRESET_DIR / f"{name}.toml"
    preset = _read_toml(preset_path) if preset_path.is_file() else {}
    sections: dict[str, Any] = {}
    for section in SECTIONS:
        cls = _param_class(section)
        if cls is not None:
            sections[section] = cls()
    origins = [f"preset:{preset_path.name}"]
    analysis = preset.get("analysis", "pixels")

    layers: list[tuple[str, dict]] = [(f"preset {preset_path}", preset)]
    if path is not None:
        user = _read_toml(Path(path))
        layers.append((str(path), user))
        origins.append(str(path))
        analysis = user.get("analysis", analysis)
    for origin, data in layers:
        for section, values in data.items():
            if section in {"analysis", "marker", "description"}:
                continue
            if not isinstance(values, Mapping):
                raise SettingsError(f"{origin}: '{section}' must be a [section] table")
            if section not in sections:
                raise SettingsError(
                    f"{origin}: unknown settings section [{section}]; valid sections are "
                    f"{', '.join(sorted(sections))}"
                )
            sections[section] = _apply(sections[section], values, section, origin)
    grouped = _group_overrides(overrides, _origin)
    if overrides is not None and isinstance(overrides, Mapping) and "analysis" in overrides:
        analysis = overrides["analysis"]
    for section, values in grouped.items():
        if section not in sections:
            raise SettingsError(
                f"{_origin}: unknown settings section '{section}'; valid sections are "
                f"{', '.join(sorted(sections))}"
            )
        sections[section] = _apply(sections[section], values, section, _origin)
    if grouped:
        origins.append(_origin)
    if analysis not in {"cells", "mhc", "pixels"}:
        raise SettingsError(f"analysis must be 'cells', 'mhc' or 'pixels', got {analysis!r}")
    return Settings(name, analysis, sections, tuple(origins))
