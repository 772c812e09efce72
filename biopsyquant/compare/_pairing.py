"""Read ``slides.csv`` (+ optional design), validate it, average replicate sections and pair biopsies.

The stages are pure functions on DataFrames; every row that is left out is recorded in a
:class:`~biopsyquant.compare._problems.Problems` list with the reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ._problems import Problems

#: columns of slides.csv that identify a slide or describe provenance, never analysed as metrics
ID_COLUMNS = frozenset({
    "slide", "path", "patient", "timepoint", "marker", "status", "error", "mpp", "mpp_source",
    "tissue_area_mm2", "n_fibers", "n_fibers_complete", "section", "replicate", "group", "overlay", "sha256",
    "file_sha256", "file_hash", "file_size_bytes", "size_bytes", "settings_digest", "width_px",
    "height_px", "levels", "n_levels", "format", "stain_model", "elapsed_s", "seconds", "time_s",
    "n_tiles", "tiles", "version", "exclusions", "exclusion", "manifest_row", "warnings",
    "analysed_area_mm2", "excluded_area_mm2", "background_r", "background_g", "background_b",
})
_ID_PATTERNS = (re.compile(r".*_(px|bytes|hash|digest|sha256|seconds|s)$"),
                re.compile(r"^(stain|background|time|timing|elapsed)_.*"),
                # areas are denominators (tissue, analysed, per compartment), not outcomes
                re.compile(r"^area_mm2_.*"), re.compile(r".*_area_mm2$"))

#: values read as "missing" (not as a non-numeric problem) in numeric columns
MISSING_TOKENS = frozenset({"", "na", "nan", "n/a", "none", "null", "-", "--", "."})

#: timepoint names treated as the baseline when the order must be inferred
_BASELINE_WORDS = frozenset({"baseline", "base", "bl", "pre", "before", "screening", "pretreatment",
                             "pre-treatment", "pre_treatment", "t0", "m0", "month0", "week0",
                             "day0", "v0", "v1", "visit1", "initial"})

_REQUIRED = ("patient", "timepoint", "marker")


def is_id_column(name: str) -> bool:
    """True for identifier/provenance columns of slides.csv that are never metrics."""
    low = name.lower()
    return low in ID_COLUMNS or any(p.match(low) for p in _ID_PATTERNS)


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    from .._batch_io import file_sha256 as _sha

    return _sha(path)


def read_table(source: pd.DataFrame | str | Path, *, what: str) -> tuple[pd.DataFrame, str, dict]:
    """Read a CSV (all cells as text) or copy a DataFrame.

    Returns
    -------
    (DataFrame, name, info)
        ``name`` is the file path (or ``"<what> DataFrame"``) used in messages; ``info`` holds
        ``path``, ``sha256``, ``rows`` for the provenance section.
    """
    if isinstance(source, pd.DataFrame):
        df = source.copy()
        df.columns = [str(c).strip() for c in df.columns]
        return df, f"{what} DataFrame", {"path": None, "sha256": None, "rows": len(df)}
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{what} file {str(path)!r} does not exist or is not a file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[],
                         skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as a CSV table ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df, str(path), {"path": str(path.resolve()), "sha256": file_sha256(path),
                           "rows": len(df)}


def to_number(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Convert a column to float.

    Returns
    -------
    (numbers, bad)
        ``numbers`` float64 with NaN for missing or unparsable cells; ``bad`` is True where a
        non-empty cell that is not a missing token (``NA``, ``nan``, ``-`` ...) failed to parse.
    """
    if pd.api.types.is_bool_dtype(values):
        return values.astype(float), pd.Series(False, index=values.index)
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(float), pd.Series(False, index=values.index)
    text = values.astype(object).where(values.notna(), "").astype(str).str.strip()
    missing = text.str.lower().isin(MISSING_TOKENS)
    num = pd.to_numeric(text.where(~missing, None), errors="coerce").astype(float)
    bad = num.isna() & ~missing
    return num, bad


def _text(values: pd.Series) -> pd.Series:
    """Column as stripped text with '' for missing."""
    return values.astype(object).where(values.notna(), "").astype(str).str.strip()


def _require(df: pd.DataFrame, name: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(
            f"{name}: missing required column {missing[0]!r}"
            + (f" (also {missing[1:]})" if len(missing) > 1 else "")
            + f"; columns present: {list(df.columns)}")


def _number_in(name: str) -> float:
    m = re.search(r"(\d+(?:\.\d+)?)", name)
    return float(m.group(1)) if m else math.inf


def infer_timepoint_order(names: list[str]) -> list[str]:
    """Order timepoint names: baseline-like words first, then by the first number in the name.

    ``["month12", "baseline", "month6"] -> ["baseline", "month6", "month12"]``.
    """
    return sorted(names, key=lambda s: (0 if s.lower() in _BASELINE_WORDS else 1,
                                        _number_in(s), s))


@dataclass
class Prepared:
    """Validated inputs ready for statistics (internal)."""

    sections: pd.DataFrame            # usable rows, one per slide and marker
    biopsies: pd.DataFrame            # patient, timepoint, marker, metric, value, n_sections, ...
    timepoints: list[str]
    timepoints_inferred: bool
    markers: list[str]
    metrics: dict[str, list[str]]
    patients: pd.DataFrame            # patient, group, clinical columns
    groups: list[str]
    clinical: list[str]
    excluded: pd.DataFrame            # slides left out: slide, patient, timepoint, marker, reason
    overlays: dict[str, Path] = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- design
def _prepare_design(design: pd.DataFrame | None, name: str, *, group_column: str,
                    clinical_columns: tuple[str, ...] | None,
                    problems: Problems) -> tuple[pd.DataFrame | None, pd.DataFrame | None,
                                                 list[str]]:
    """Split a design table into a slide map (if it has ``slide``) and per-patient attributes.

    Returns ``(slide_map, patients, clinical_columns)``; ``patients`` has ``patient``,
    ``group`` and the numeric clinical columns.
    """
    if design is None:
        return None, None, []
    _require(design, name, ("patient",))
    d = design.copy()
    d["patient"] = _text(d["patient"])
    if (d["patient"] == "").any():
        rows = [int(i) + 2 for i in np.flatnonzero(d["patient"] == "")]
        problems.add("design_missing_patient", f"{name}: rows {rows} have no patient id; ignored",
                     severity="error")
        d = d[d["patient"] != ""]
    slide_map = None
    if "slide" in d.columns:
        keep = [c for c in ("slide", "patient", "timepoint") if c in d.columns]
        slide_map = d[keep].copy()
        for c in keep:
            slide_map[c] = _text(slide_map[c])
    if clinical_columns is not None:
        for c in clinical_columns:
            if c not in d.columns:
                raise InputError(f"{name}: missing clinical column {c!r}; columns present: "
                                 f"{list(d.columns)}")
    skip = {"patient", "slide", "timepoint", "path", "marker", group_column}
    candidates = list(clinical_columns) if clinical_columns is not None else [
        c for c in d.columns if c not in skip]
    clinical: list[str] = []
    numeric: dict[str, pd.Series] = {}
    for c in candidates:
        num, bad = to_number(d[c])
        filled = (~_text(d[c]).str.lower().isin(MISSING_TOKENS)) if not \
            pd.api.types.is_numeric_dtype(d[c]) else d[c].notna()
        n_filled = int(filled.sum())
        if clinical_columns is None and (n_filled == 0 or int(bad.sum()) > n_filled / 2):
            problems.add("non_numeric_column",
                         f"{name}: column {c!r} is not numeric ({int(bad.sum())} of {n_filled} "
                         "values are text); not used as a clinical variable", severity="info")
            continue
        clinical.append(c)
        numeric[c] = num
        for i in np.flatnonzero(bad.to_numpy()):
            row = d.iloc[i]
            problems.add("non_numeric_clinical",
                         f"{name}: {c} = {str(row[c])!r} for patient {row['patient']} is not a "
                         "number; treated as missing (patient left out of correlations with "
                         f"{c})", patient=row["patient"], metric=c)
    has_group = group_column in d.columns
    rows = []
    for pid, sub in d.groupby("patient", sort=False):
        rec = {"patient": pid, "group": ""}
        if has_group:
            vals = [v for v in _text(sub[group_column]).unique() if v != ""]
            if len(vals) > 1:
                problems.add("conflicting_group",
                             f"{name}: patient {pid} has several {group_column} values {vals}; "
                             "patient left without a group", patient=pid, severity="error")
            elif vals:
                rec["group"] = vals[0]
        for c in clinical:
            vals = numeric[c].loc[sub.index].dropna().unique()
            if len(vals) > 1:
                problems.add("conflicting_clinical",
                             f"{name}: patient {pid} has several {c} values "
                             f"{[float(v) for v in vals]}; treated as missing", patient=pid,
                             metric=c, severity="error")
                rec[c] = np.nan
            else:
                rec[c] = float(vals[0]) if len(vals) else np.nan
        rows.append(rec)
    patients = pd.DataFrame(rows, columns=["patient", "group", *clinical])
    if has_group:
        for pid in patients.loc[patients["group"] == "", "patient"]:
            problems.add("missing_group", f"{name}: patient {pid} has no {group_column}; "
                         "included in whole-cohort statistics only", patient=pid)
    else:
        problems.add("no_group_column", f"{name}: no {group_column!r} column; no between-group "
                     "tests", severity="info")
    return slide_map, patients, clinical


# --------------------------------------------------------------------------- slides
def prepare(slides: pd.DataFrame | str | Path, *, design: pd.DataFrame | str | Path | None,
            settings, problems: Problems) -> Prepared:
    """Validate ``slides`` (+ ``design``), exclude unusable rows and aggregate replicates.

    ``settings`` is a :class:`~biopsyquant.compare.CompareSettings`.
    """
    df, sname, sinfo = read_table(slides, what="slides")
    inputs = {"slides": sinfo, "slides_name": sname}
    dsrc = None
    dname = ""
    if design is not None:
        dsrc, dname, dinfo = read_table(design, what="design")
        inputs["design"] = dinfo
        inputs["design_name"] = dname
    slide_map, patients, clinical = _prepare_design(
        dsrc, dname, group_column=settings.group_column,
        clinical_columns=settings.clinical_columns, problems=problems)

    if df.empty:
        raise InputError(f"{sname}: has no rows")
    df = df.reset_index(drop=True)
    df["_row"] = np.arange(len(df)) + 2  # line number in the CSV (header is line 1)
    if "slide" not in df.columns:
        base = _text(df["path"]).map(lambda p: Path(p).stem if p else "") if "path" in \
            df.columns else pd.Series("", index=df.index)
        df["slide"] = [b or f"row{r}" for b, r in zip(base, df["_row"], strict=True)]
        problems.add("no_slide_column", f"{sname}: no 'slide' column; slides named by path stem "
                     "or CSV line number", severity="info")

    # patient/timepoint from a slide-level design
    if slide_map is not None:
        df["slide"] = _text(df["slide"])
        sm = slide_map.drop_duplicates("slide").set_index("slide")
        for col in ("patient", "timepoint"):
            if col not in sm.columns:
                continue
            mapped = df["slide"].map(sm[col])
            if col in df.columns:
                old = _text(df[col])
                conflict = mapped.notna() & (old != "") & (old != mapped)
                for i in np.flatnonzero(conflict.to_numpy()):
                    problems.add("design_conflict",
                                 f"{sname} says {col} {old.iloc[i]!r} for slide "
                                 f"{df['slide'].iloc[i]} but {dname} says {mapped.iloc[i]!r}; "
                                 f"using {dname}", slide=df["slide"].iloc[i])
                df[col] = mapped.where(mapped.notna(), old)
            else:
                df[col] = mapped.fillna("")
    _require(df, sname, _REQUIRED)
    for c in ("slide", "patient", "timepoint", "marker"):
        df[c] = _text(df[c])

    excluded: list[dict] = []

    def exclude(mask: pd.Series, kind: str, reason_of, *, severity: str = "error") -> None:
        nonlocal df
        for i in np.flatnonzero(mask.to_numpy()):
            r = df.iloc[i]
            reason = reason_of(r)
            problems.add(kind, reason, severity=severity, patient=r["patient"],
                         timepoint=r["timepoint"], marker=r["marker"], slide=r["slide"])
            excluded.append({"slide": r["slide"], "patient": r["patient"],
                             "timepoint": r["timepoint"], "marker": r["marker"], "kind": kind,
                             "reason": reason})
        df = df[~mask.to_numpy()]

    # failed slides
    if "status" in df.columns and (_text(df["status"]) == "").all():
        problems.add("no_status_column", f"{sname}: the 'status' column is empty; every row "
                     "treated as successfully scored", severity="info")
    elif "status" in df.columns:
        status = _text(df["status"]).str.lower()
        err = _text(df["error"]) if "error" in df.columns else pd.Series("", index=df.index)
        df = df.assign(_status=status, _err=err)
        exclude(df["_status"] != "ok", "failed_slide",
                lambda r: f"slide {r['slide']} ("
                + ", ".join(x for x in (r["marker"], r["patient"] and f"patient {r['patient']}",
                                        r["timepoint"]) if x)
                + f") has status {r['_status'] or 'empty'!r}"
                + (f": {r['_err']}" if r["_err"] else "") + "; excluded")
    else:
        problems.add("no_status_column", f"{sname}: no 'status' column; every row treated as "
                     "successfully scored", severity="info")

    # rows without identifiers
    for col in _REQUIRED:
        exclude(df[col] == "", f"missing_{col}",
                lambda r, col=col: f"{sname} line {r['_row']}: slide {r['slide']} has no {col}; "
                "excluded")

    def no_rows_left(stage: str) -> None:
        if len(df):
            return
        kinds = pd.Series([e["kind"] for e in excluded]).value_counts()
        first = next((e["reason"] for e in excluded), "")
        raise InputError(
            f"{sname}: no usable rows {stage}: all {len(excluded)} row(s) excluded ("
            + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")"
            + (f"; first: {first}" if first else ""))

    no_rows_left("after removing failed slides")

    # timepoints
    present = list(dict.fromkeys(df["timepoint"]))
    inferred = settings.timepoints is None
    if inferred:
        timepoints = infer_timepoint_order(present)
        if len(timepoints) >= 2:
            problems.add("timepoint_order_inferred",
                         f"timepoint order inferred as {' < '.join(timepoints)} (baseline = "
                         f"{timepoints[0]}); pass --timepoints to set it", severity="info")
    else:
        timepoints = list(settings.timepoints)
        lower = {t.lower(): t for t in timepoints}
        recase = {p: lower[p.lower()] for p in present if p not in timepoints
                  and p.lower() in lower}
        if recase:
            df["timepoint"] = df["timepoint"].replace(recase)
            problems.add("timepoint_case", "timepoint names matched ignoring case: "
                         + ", ".join(f"{k!r} -> {v!r}" for k, v in recase.items()),
                         severity="info")
        unknown = ~df["timepoint"].isin(timepoints)
        exclude(unknown, "unknown_timepoint",
                lambda r: f"slide {r['slide']}: timepoint {r['timepoint']!r} is not one of "
                f"{timepoints} (--timepoints); excluded")
        no_rows_left(f"with timepoints {timepoints}")
        for t in timepoints:
            if not (df["timepoint"] == t).any():
                problems.add("timepoint_absent", f"timepoint {t!r} (from --timepoints) has no "
                             "usable slide", timepoint=t, severity="error")
    if len(timepoints) < 2:
        raise InputError(f"{sname}: a comparison needs at least two timepoints, found "
                         f"{timepoints or 'none'} among the usable rows")

    # markers
    if settings.markers is not None:
        want = list(settings.markers)
        for m in want:
            if not (df["marker"] == m).any():
                problems.add("marker_absent", f"marker {m!r} (from --markers) has no usable "
                             "slide", marker=m, severity="error")
        other = ~df["marker"].isin(want)
        if other.any():
            problems.add("marker_not_selected", f"{int(other.sum())} rows of other markers "
                         f"{sorted(set(df.loc[other, 'marker']))} not analysed (--markers)",
                         severity="info")
            df = df[~other]
    markers = list(dict.fromkeys(df["marker"]))

    # duplicates: the same slide (or the same file) twice for one marker
    metric_cols = [c for c in df.columns if not c.startswith("_") and not is_id_column(c)
                   and c != settings.group_column]
    keys = [["slide", "marker"]]
    if "path" in df.columns:
        df["_path"] = _text(df["path"])
        keys.append(["_path", "marker"])
    for key in keys:
        sub = df if key[0] == "slide" else df[df["_path"] != ""]
        dup = sub.duplicated(key, keep=False)
        if not dup.any():
            continue
        drop_idx: list = []
        for _, grp in sub[dup].groupby(key, sort=False):
            compare_cols = ["patient", "timepoint", *metric_cols]
            same = grp[compare_cols].astype(str).drop_duplicates().shape[0] == 1
            first = grp.iloc[0]
            what = "slide" if key[0] == "slide" else "file"
            ident = first["slide"] if key[0] == "slide" else first["_path"]
            lines = grp["_row"].tolist()
            if same:
                problems.add("duplicate_row",
                             f"{what} {ident} ({first['marker']}) appears {len(grp)} times "
                             f"(lines {lines}) with identical values; counted once",
                             patient=first["patient"], timepoint=first["timepoint"],
                             marker=first["marker"], slide=first["slide"])
                drop_idx.extend(grp.index[1:])
            else:
                reason = (f"{what} {ident} ({first['marker']}) appears {len(grp)} times "
                          f"(lines {lines}) with different values; all copies excluded")
                problems.add("conflicting_duplicate", reason, severity="error",
                             patient=first["patient"], timepoint=first["timepoint"],
                             marker=first["marker"], slide=first["slide"])
                for _, r in grp.iterrows():
                    excluded.append({"slide": r["slide"], "patient": r["patient"],
                                     "timepoint": r["timepoint"], "marker": r["marker"],
                                     "kind": "conflicting_duplicate", "reason": reason})
                drop_idx.extend(grp.index)
        df = df.drop(index=drop_idx)

    # metrics
    numeric: dict[str, pd.Series] = {}
    for c in metric_cols:
        if pd.api.types.is_bool_dtype(df[c]):
            continue  # flags are not measurements
        num, bad = to_number(df[c])
        n_filled = int((num.notna() | bad).sum())
        if n_filled == 0 or int(bad.sum()) > n_filled / 2:
            continue  # a text column (or empty everywhere)
        numeric[c] = num
        for i in np.flatnonzero(bad.to_numpy()):
            r = df.iloc[i]
            problems.add("non_numeric_value", f"slide {r['slide']}: {c} = {str(r[c])!r} is not a "
                         "number; treated as missing", patient=r["patient"],
                         timepoint=r["timepoint"], marker=r["marker"], slide=r["slide"], metric=c)
    for c, num in numeric.items():
        df[c] = num
    metrics = _select_metrics(df, sname, markers, numeric, settings, problems)

    # patients and groups
    slide_patients = list(dict.fromkeys(df["patient"]))
    if patients is None:
        patients = pd.DataFrame({"patient": slide_patients, "group": ""})
        if settings.group_column in df.columns:
            g = df.assign(_g=_text(df[settings.group_column]))
            for pid, sub in g.groupby("patient", sort=False):
                vals = [v for v in sub["_g"].unique() if v]
                if len(vals) == 1:
                    patients.loc[patients["patient"] == pid, "group"] = vals[0]
                elif len(vals) > 1:
                    problems.add("conflicting_group", f"{sname}: patient {pid} has several "
                                 f"{settings.group_column} values {vals}; no group",
                                 patient=pid, severity="error")
        else:
            problems.add("no_group_column", f"no design file and no {settings.group_column!r} "
                         f"column in {sname}: no between-group tests", severity="info")
    else:
        known = set(patients["patient"])
        for pid in slide_patients:
            if pid not in known:
                problems.add("patient_not_in_design",
                             f"patient {pid} has slides but is not in {dname}: no group and no "
                             "clinical values; included in whole-cohort statistics only",
                             patient=pid)
        for pid in patients["patient"]:
            if pid not in set(slide_patients):
                problems.add("patient_without_slides",
                             f"patient {pid} is in {dname} but has no usable slide",
                             patient=pid, severity="warning")
        extra = pd.DataFrame({"patient": [p for p in slide_patients if p not in known],
                              "group": ""})
        patients = pd.concat([patients[patients["patient"].isin(slide_patients)], extra],
                             ignore_index=True)
        for c in clinical:
            for pid in patients.loc[patients[c].isna() & patients["patient"].isin(known),
                                    "patient"]:
                problems.add("missing_clinical", f"patient {pid} has no {c} value; left out of "
                             f"correlations with {c}", patient=pid, metric=c, severity="info")
    groups = [g for g in dict.fromkeys(patients["group"]) if g]

    biopsies = _aggregate(df, metrics)
    overlays = _find_overlays(df, sinfo, settings, problems)
    ex = pd.DataFrame(excluded, columns=["slide", "patient", "timepoint", "marker", "kind",
                                         "reason"])
    keep_cols = ["slide", "patient", "timepoint", "marker"] + \
        sorted({m for ms in metrics.values() for m in ms})
    sections = df[keep_cols + ["_row"]].rename(columns={"_row": "line"}).reset_index(drop=True)
    return Prepared(sections=sections, biopsies=biopsies, timepoints=timepoints,
                    timepoints_inferred=inferred, markers=[m for m in markers if metrics.get(m)],
                    metrics=metrics, patients=patients.reset_index(drop=True), groups=groups,
                    clinical=clinical, excluded=ex, overlays=overlays, inputs=inputs)


def _select_metrics(df: pd.DataFrame, sname: str, markers: list[str],
                    numeric: dict[str, pd.Series], settings, problems: Problems
                    ) -> dict[str, list[str]]:
    """Metric columns per marker: those with at least one value for that marker's slides."""
    has = {m: [c for c in numeric if df.loc[df["marker"] == m, c].notna().any()]
           for m in markers}
    if settings.metrics is None:
        for m in markers:
            if not has[m]:
                problems.add("no_metrics", f"marker {m}: no numeric metric column has a value; "
                             "marker not analysed", marker=m, severity="error")
        return has
    out: dict[str, list[str]] = {m: [] for m in markers}
    for spec in settings.metrics:
        marker, _, metric = spec.rpartition(":")
        if metric not in df.columns:
            raise InputError(f"{sname}: missing metric column {metric!r} (from --metrics); "
                             f"numeric columns present: {list(numeric)}")
        if metric not in numeric:
            raise InputError(f"{sname}: column {metric!r} (from --metrics) is not numeric")
        targets = [marker] if marker else markers
        if marker and marker not in markers:
            problems.add("marker_absent", f"--metrics {spec}: marker {marker!r} has no usable "
                         "slide", marker=marker, metric=metric, severity="error")
            continue
        hit = False
        for m in targets:
            if metric in has[m]:
                if metric not in out[m]:
                    out[m].append(metric)
                hit = True
            elif marker:
                problems.add("metric_all_missing", f"{m}: metric {metric} has no value on any "
                             "usable slide", marker=m, metric=metric, severity="error")
        if not hit and not marker:
            problems.add("metric_all_missing", f"metric {metric} has no value for any marker",
                         metric=metric, severity="error")
    return {m: v for m, v in out.items() if v}


def _aggregate(df: pd.DataFrame, metrics: dict[str, list[str]]) -> pd.DataFrame:
    """Average replicate sections: one row per patient, timepoint, marker and metric.

    ``value`` is the mean over the sections with a finite value (``n_sections`` of them),
    ``sd`` their standard deviation (ddof 1), ``n_rows`` the number of usable slide rows.
    """
    cols = ["patient", "timepoint", "marker", "metric", "value", "sd", "n_sections", "n_rows",
            "slides"]
    keys = ["patient", "timepoint", "marker"]
    parts = []
    for marker, mets in metrics.items():
        sub = df[df["marker"] == marker]
        if sub.empty or not mets:
            continue
        g = sub.groupby(keys, sort=False)
        base = pd.DataFrame({"n_rows": g.size(), "slides": g["slide"].agg(";".join)})
        for metric in mets:
            a = g[metric].agg(["mean", "std", "count"])
            part = base.assign(metric=metric, value=a["mean"].astype(float),
                               sd=a["std"].astype(float), n_sections=a["count"].astype(int))
            parts.append(part.reset_index())
    if not parts:
        return pd.DataFrame(columns=cols)
    return pd.concat(parts, ignore_index=True)[cols]


_IMG_EXT = (".png", ".jpg", ".jpeg", ".webp", ".svg")


def _find_overlays(df: pd.DataFrame, sinfo: dict, settings, problems: Problems
                   ) -> dict[str, Path]:
    """QC overlay image per slide: the ``overlay`` column, else ``overlays/<slide>.*``."""
    base = Path(sinfo["path"]).parent if sinfo.get("path") else None
    found: dict[str, Path] = {}
    missing: list[str] = []
    has_col = "overlay" in df.columns
    for _, r in df.iterrows():
        key = f"{r['slide']}|{r['marker']}"
        cands: list[Path] = []
        if has_col and str(r["overlay"]).strip() not in ("", "nan"):
            p = Path(str(r["overlay"]).strip())
            cands.append(p if p.is_absolute() or base is None else base / p)
        if base is not None:
            stems = [r["slide"], f"{r['slide']}_{r['marker']}"]
            if "path" in df.columns and str(r["path"]).strip():
                stems.append(Path(str(r["path"])).stem)
            cands += [base / "overlays" / f"{s}{e}" for s in stems for e in _IMG_EXT]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is not None:
            found[key] = hit
        elif has_col or base is not None:
            missing.append(r["slide"])
    if found and missing:
        problems.add("overlay_missing", f"no QC overlay found for {len(missing)} slide(s): "
                     + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    elif not found:
        problems.add("no_overlays", "no QC overlays found (no 'overlay' column and no "
                     "overlays/ folder next to slides.csv)", severity="info")
    return found
