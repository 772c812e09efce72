"""Batch inputs: expand paths and folders, read a manifest, parse file names, name slides.

Each input becomes a :class:`SlideInput` carrying its marker (from ``--marker``, the file-name
pattern or the manifest), patient/timepoint fields, an optional pixel-size override and an
optional exclusion GeoJSON. Problems that concern one file (no marker, name not matching the
pattern) are kept on the input as ``problem`` and reported as an ``error`` row, so the other
slides still run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import InputError, SettingsError
from .settings import canonical_marker

#: file suffixes treated as images when scanning folders (other files are skipped and listed)
IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".btf", ".tf2", ".tf8",
                  ".qptiff", ".png", ".jpg", ".jpeg", ".mrxs", ".vms", ".vmu", ".czi")

DEFAULT_PATTERN = "{patient}_{timepoint}_{marker}"


@dataclass
class SlideInput:
    """One file to score with one marker.

    Attributes
    ----------
    path : Path
    name : str
        Unique slide name in this run (the file stem unless two files share it).
    marker : str or None
        Canonical marker (None when it could not be determined; see ``problem``).
    fields : dict
        ``patient``, ``timepoint`` and any other field of the pattern or manifest.
    mpp : float or None
        Pixel-size override (µm/px), source ``user``.
    exclusions : Path or None
        GeoJSON of regions to exclude.
    problem : str or None
        Why this input cannot be scored (becomes its error message).
    """

    path: Path
    name: str = ""
    marker: str | None = None
    fields: dict = field(default_factory=dict)
    mpp: float | None = None
    exclusions: Path | None = None
    problem: str | None = None
    order: int = 0


def slide_stem(path: Path) -> str:
    """File name without its image suffix (``a.ome.tif`` -> ``a``)."""
    name = path.name
    for suf in (".ome.tiff", ".ome.tif", ".ome.btf"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def compile_pattern(pattern: str) -> re.Pattern:
    """Regex for a file-name pattern such as ``"{patient}_{timepoint}_{marker}"``.

    Each ``{field}`` matches one or more characters (the shortest that lets the whole stem
    match); everything else matches literally.
    """
    parts = re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", pattern)
    names = [p[1:-1] for p in parts if p.startswith("{") and p.endswith("}")]
    if not names:
        raise InputError(f"--pattern {pattern!r} has no {{field}}; e.g. "
                         f"'{DEFAULT_PATTERN}'")
    if len(set(names)) != len(names):
        raise InputError(f"--pattern {pattern!r} repeats a field")
    rx = "".join(f"(?P<{p[1:-1]}>.+?)" if p.startswith("{") and p.endswith("}")
                 else re.escape(p) for p in parts)
    return re.compile(f"^{rx}$")


def _scan(paths: list[Path], recursive: bool) -> tuple[list[Path], list[dict]]:
    files: list[Path] = []
    skipped: list[dict] = []
    for p in paths:
        if p.is_dir():
            it = sorted(p.rglob("*") if recursive else p.iterdir())
            for f in it:
                if f.name.startswith("."):
                    continue
                if f.is_dir():
                    if f.suffix.lower() == ".mrxs":
                        continue
                    if not recursive:
                        skipped.append({"path": str(f), "reason": "folder (use --recursive)"})
                    continue
                if f.name.lower().endswith(IMAGE_SUFFIXES):
                    files.append(f)
                else:
                    skipped.append({"path": str(f), "reason": "not an image file name"})
        else:  # explicit files are always attempted (missing -> error row)
            files.append(p)
    # same file given twice: keep the first
    seen: set[str] = set()
    unique = []
    for f in files:
        key = str(f.resolve())
        if key in seen:
            skipped.append({"path": str(f), "reason": "listed twice"})
            continue
        seen.add(key)
        unique.append(f)
    return unique, skipped


def _assign_names(inputs: list[SlideInput]) -> list[str]:
    """Unique slide names: the stem, or for clashes the stem plus folder / suffix."""
    notes = []
    by_stem: dict[tuple[str, str], list[SlideInput]] = {}
    for s in inputs:
        if not s.name:
            s.name = slide_stem(s.path)
        by_stem.setdefault((s.name.lower(), s.marker or ""), []).append(s)
    taken = {k[0] for k, v in by_stem.items() if len(v) == 1}
    for (_stem, _marker), group in by_stem.items():
        if len(group) == 1:
            continue
        taken.add(group[0].name.lower())  # the first keeps its name
        for i, s in enumerate(group[1:], start=1):
            base = s.name
            cand = f"{base}__{s.path.parent.name}" if s.path.parent.name else base
            if cand.lower() in taken or sum(
                    1 for g in group if g.path.parent.name == s.path.parent.name) > 1:
                suffix = s.path.suffix.lstrip(".").lower() or str(i + 1)
                cand = f"{cand}__{suffix}"
            k = 2
            final = cand
            while final.lower() in taken:
                final = f"{cand}~{k}"
                k += 1
            taken.add(final.lower())
            notes.append(f"two inputs are named {base!r}: {s.path} is called {final!r}")
            s.name = final
    return notes


def _as_float(v, where: str) -> float | None:
    if v is None or (isinstance(v, float) and pd.isna(v)) or str(v).strip() == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{where}: mpp {v!r} is not a number") from None
    if not f > 0:
        raise InputError(f"{where}: mpp must be positive, got {v!r}")
    return f


def read_manifest(path: str | Path) -> list[SlideInput]:
    """Inputs from a manifest CSV.

    Columns: ``path`` (required; relative to the manifest's folder), ``marker``, ``patient``,
    ``timepoint``, ``mpp`` (override, µm/px), ``exclusions`` (GeoJSON path), ``name``; other
    columns are carried into the outputs as fields.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise InputError(f"manifest {path} not found") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"manifest {path} is not a readable CSV: {exc}") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    if "path" not in df.columns:
        raise InputError(f"manifest {path} needs a 'path' column; it has {list(df.columns)}")
    base = path.parent
    out = []
    for i, row in df.iterrows():
        where = f"manifest {path.name} row {i + 2}"
        raw = str(row["path"]).strip()
        if not raw:
            raise InputError(f"{where}: empty path")
        p = Path(raw).expanduser()
        p = p if p.is_absolute() else base / p
        s = SlideInput(path=p, order=len(out))
        s.name = str(row.get("name", "") or "").strip()
        s.mpp = _as_float(row.get("mpp"), where)
        ex = str(row.get("exclusions", "") or row.get("exclusion", "") or "").strip()
        if ex:
            e = Path(ex).expanduser()
            s.exclusions = e if e.is_absolute() else base / e
        m = str(row.get("marker", "") or "").strip()
        if m:
            try:
                s.marker = canonical_marker(m)
            except SettingsError as exc:
                s.problem = f"{where}: {exc}"
        for c in df.columns:
            if c not in {"path", "marker", "mpp", "exclusions", "exclusion", "name"}:
                val = str(row[c]).strip()
                s.fields[c] = val
        out.append(s)
    return out


def gather_inputs(
    paths: list[str | Path] | None,
    *,
    marker: str | None = None,
    pattern: str | None = None,
    manifest: str | Path | None = None,
    recursive: bool = False,
    mpp: float | None = None,
    exclusions: str | Path | None = None,
) -> tuple[list[SlideInput], list[dict], list[str]]:
    """Resolve the inputs of a batch run.

    Returns
    -------
    inputs : list of SlideInput
        In a stable order (manifest order, then paths as given, folders sorted).
    skipped : list of dict
        Files seen in folders but not scored (``path``, ``reason``).
    notes : list of str
        Things the user should know (renamed duplicates, ...).
    """
    fixed_marker = canonical_marker(marker) if marker else None
    rx = compile_pattern(pattern) if pattern else None
    inputs: list[SlideInput] = []
    skipped: list[dict] = []
    if manifest is not None:
        inputs.extend(read_manifest(manifest))
    if paths:
        files, skipped = _scan([Path(p).expanduser() for p in paths], recursive)
        for f in files:
            inputs.append(SlideInput(path=f, order=len(inputs)))
    if not inputs:
        raise InputError("no input images: give image files, folders or --manifest "
                         + (f"(folders held only: {', '.join(Path(s['path']).name for s in skipped[:5])})"
                            if skipped else ""))
    for s in inputs:
        if mpp is not None and s.mpp is None:
            s.mpp = float(mpp)
        if exclusions is not None and s.exclusions is None:
            s.exclusions = Path(exclusions)
        if rx is not None:
            m = rx.match(slide_stem(s.path))
            if m:
                for k, v in m.groupdict().items():
                    if k == "marker":
                        continue
                    s.fields.setdefault(k, v)
                if "marker" in m.groupdict() and s.marker is None and s.problem is None:
                    try:
                        s.marker = canonical_marker(m.group("marker"))
                    except SettingsError as exc:
                        if fixed_marker is None:
                            s.problem = (f"marker {m.group('marker')!r} from the file name "
                                         f"(pattern {pattern!r}) is not known: {exc}")
            elif fixed_marker is None and s.marker is None:
                s.problem = (f"file name {slide_stem(s.path)!r} does not match --pattern "
                             f"{pattern!r}, and no --marker was given")
        if s.marker is None and s.problem is None:
            if fixed_marker is not None:
                s.marker = fixed_marker
            else:
                s.problem = ("no marker for this file: give --marker, a --pattern with "
                             "{marker}, or a manifest 'marker' column")
        s.fields.setdefault("patient", "")
        s.fields.setdefault("timepoint", "")
    notes = _assign_names(inputs)
    return inputs, skipped, notes
