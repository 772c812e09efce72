"""Public entry point :func:`compare_slides` and its settings/result types."""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from .. import __version__
from ..errors import InputError, SettingsError
from ._analysis import (
    build_correlations,
    build_group_tests,
    build_paired,
    build_presence,
    build_stats,
)
from ._pairing import prepare
from ._problems import Problems


@dataclass(frozen=True)
class CompareSettings:
    """Every choice of a comparison run (saved in the report's provenance).

    Parameters
    ----------
    timepoints : tuple of str, optional
        Timepoint names in order, baseline first.  ``None`` infers the order (baseline-like
        names first, then by the number in the name) and says so in the problems list.
    markers : tuple of str, optional
        Markers to analyse; ``None`` = all in slides.csv.
    metrics : tuple of str, optional
        Metric columns, each ``"metric"`` (any marker having it) or ``"MARKER:metric"``.
        ``None`` = every numeric non-identifier column with a value for the marker.
    group_column : str
        Column of the design file (or slides.csv) holding the patient group.
    clinical_columns : tuple of str, optional
        Clinical columns of the design file to correlate; ``None`` = every numeric column other
        than patient/group/slide/timepoint.
    presence_thresholds : tuple of (marker or "", metric, threshold)
        Presence means ``value > threshold`` (metric units).  Fisher tests per threshold.
    n_bootstrap : int
        Bootstrap resamples for the CI of the median change (percentile method); 0 = none.
    seed : int
        Seed of every bootstrap (each analysis gets its own stream from seed and its key).
    confidence_level : float
        Level of all confidence intervals.
    zero_method : {"wilcox", "pratt", "zsplit"}
        Zero-change handling of the Wilcoxon signed-rank test (scipy); ``"wilcox"`` drops zeros
        (as R ``wilcox.test`` and SPSS).
    min_pairs : int
        Minimum usable pairs for a signed-rank test and a bootstrap CI.
    min_group_size : int
        Minimum patients per group for Mann–Whitney and Fisher tests.
    min_correlation_n : int
        Minimum patients with both values for a Spearman correlation (>= 4).
    pseudocount : float or "auto"
        Added to both values before log2 fold change; ``"auto"`` = half the smallest positive
        value of that marker × metric over all biopsies of the cohort.
    """

    timepoints: tuple[str, ...] | None = None
    markers: tuple[str, ...] | None = None
    metrics: tuple[str, ...] | None = None
    group_column: str = "group"
    clinical_columns: tuple[str, ...] | None = None
    presence_thresholds: tuple[tuple[str, str, float], ...] = ()
    n_bootstrap: int = 2000
    seed: int = 0
    confidence_level: float = 0.95
    zero_method: str = "wilcox"
    min_pairs: int = 3
    min_group_size: int = 3
    min_correlation_n: int = 5
    pseudocount: float | str = "auto"

    def __post_init__(self) -> None:
        if self.zero_method not in ("wilcox", "pratt", "zsplit"):
            raise SettingsError(f"zero_method must be 'wilcox', 'pratt' or 'zsplit', got "
                                f"{self.zero_method!r}")
        if not 0 < self.confidence_level < 1:
            raise SettingsError(f"confidence_level must be in (0, 1), got "
                                f"{self.confidence_level}")
        if self.n_bootstrap < 0:
            raise SettingsError(f"n_bootstrap must be >= 0, got {self.n_bootstrap}")
        if self.timepoints is not None:
            if len(self.timepoints) < 2:
                raise SettingsError(f"timepoints needs at least two names, got "
                                    f"{list(self.timepoints)}")
            if len(set(self.timepoints)) != len(self.timepoints):
                raise SettingsError(f"timepoints has a repeated name: {list(self.timepoints)}")
        if self.min_pairs < 1 or self.min_group_size < 1 or self.min_correlation_n < 4:
            raise SettingsError("min_pairs and min_group_size must be >= 1 and "
                                "min_correlation_n >= 4")
        if self.pseudocount != "auto" and not (isinstance(self.pseudocount, (int, float))
                                               and self.pseudocount > 0):
            raise SettingsError(f"pseudocount must be 'auto' or a positive number, got "
                                f"{self.pseudocount!r}")

    def to_dict(self) -> dict:
        """Plain-JSON dictionary of the settings."""
        d = asdict(self)
        d["presence_thresholds"] = [list(t) for t in self.presence_thresholds]
        return d


def parse_presence_thresholds(specs: Iterable[str] | Mapping[str, float] | None
                              ) -> tuple[tuple[str, str, float], ...]:
    """Parse ``"metric=value"`` / ``"MARKER:metric=value"`` (or a mapping) into tuples.

    >>> parse_presence_thresholds(["IL-1Ra:positive_area_pct=1"])
    (('IL-1Ra', 'positive_area_pct', 1.0),)
    """
    if not specs:
        return ()
    items = specs.items() if isinstance(specs, Mapping) else []
    out = []
    if not isinstance(specs, Mapping):
        for s in specs:
            key, sep, val = str(s).partition("=")
            if not sep:
                m = re.match(r"^(.*?)\s*>\s*(.*)$", str(s))
                if not m:
                    raise SettingsError(f"presence threshold {s!r} must look like "
                                        "metric=value or MARKER:metric=value")
                key, val = m.group(1), m.group(2)
            items = [*items, (key.strip(), val.strip())]
    for key, val in items:
        try:
            v = float(val)
        except (TypeError, ValueError):
            raise SettingsError(f"presence threshold for {key!r}: {val!r} is not a number") \
                from None
        marker, _, metric = str(key).rpartition(":")
        if not metric:
            raise SettingsError(f"presence threshold {key!r}: no metric name")
        out.append((marker, metric, v))
    return tuple(out)


@dataclass
class ComparisonResult:
    """Tables and metadata of one comparison; write it with :func:`write_report`.

    Attributes
    ----------
    paired : DataFrame
        One row per patient × marker × metric: ``value_<tp>``, ``n_sections_<tp>``,
        ``change_<tp>``, ``pct_change_<tp>``, ``log2fc_<tp>``, ``direction_<tp>``, ``note``.
    stats : DataFrame
        Within-patient change per marker × metric × contrast × subset (all, each group):
        n pairs, median change + bootstrap CI, Wilcoxon signed-rank, Holm-adjusted p.
    group_tests : DataFrame
        Mann–Whitney U on changes between groups, rank-biserial effect size.
    presence : DataFrame
        Presence counts per group and timepoint with Fisher's exact test.
    correlations : DataFrame
        Spearman rho (Fisher-z CI) of baseline values and changes against clinical columns.
    problems : DataFrame
        Every data problem (severity, kind, patient, timepoint, marker, slide, metric, message).
    sections : DataFrame
        The usable slide rows the analysis used.
    excluded : DataFrame
        Slides left out, with reason.
    patients : DataFrame
        patient, group and clinical columns.
    """

    paired: pd.DataFrame
    stats: pd.DataFrame
    group_tests: pd.DataFrame
    presence: pd.DataFrame
    correlations: pd.DataFrame
    problems: pd.DataFrame
    sections: pd.DataFrame
    excluded: pd.DataFrame
    patients: pd.DataFrame
    timepoints: list[str]
    markers: list[str]
    metrics: dict[str, list[str]]
    groups: list[str]
    clinical: list[str]
    settings: CompareSettings
    overlays: dict[str, Path] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        return self.timepoints[0]

    @property
    def contrasts(self) -> list[tuple[str, str]]:
        """``(followup, baseline)`` pairs: every later timepoint against the first."""
        return [(tp, self.timepoints[0]) for tp in self.timepoints[1:]]


def compare_slides(
    slides: pd.DataFrame | str | Path,
    *,
    design: pd.DataFrame | str | Path | None = None,
    settings: CompareSettings | None = None,
    **overrides,
) -> ComparisonResult:
    """Pair pre/post biopsies from a ``slides.csv`` table and compute the comparison statistics.

    Parameters
    ----------
    slides : DataFrame or path
        Batch-scoring output: one row per slide and marker with ``patient``, ``timepoint``,
        ``marker`` (``status``, ``slide``, ``path`` optional) and numeric metric columns.
        Several usable rows for the same patient, timepoint and marker are replicate sections:
        their mean is used and their number recorded.
    design : DataFrame or path, optional
        One row per patient: ``patient``, a group column (``settings.group_column``) and
        numeric clinical columns (e.g. ``MMT8``).  With a ``slide`` column it may also give
        ``patient``/``timepoint`` per slide.
    settings : CompareSettings, optional
        All options; keyword ``overrides`` replace single fields, e.g. ``timepoints=("baseline",
        "month6")`` or ``presence_thresholds=["IL-1Ra:positive_area_pct=1"]``.

    Returns
    -------
    ComparisonResult

    Raises
    ------
    biopsyquant.errors.InputError
        A file is missing/unreadable, a required column is absent (the message names file and
        column), or fewer than two timepoints remain.
    biopsyquant.errors.SettingsError
        An invalid option.
    """
    base = settings or CompareSettings()
    if overrides:
        fields = set(CompareSettings.__dataclass_fields__)
        unknown = set(overrides) - fields
        if unknown:
            raise SettingsError(f"unknown compare setting(s) {sorted(unknown)}; valid: "
                                f"{sorted(fields)}")
        ov = dict(overrides)
        for k in ("timepoints", "markers", "metrics", "clinical_columns"):
            if k in ov and ov[k] is not None:
                v = ov[k]
                ov[k] = tuple(x.strip() for x in (v.split(",") if isinstance(v, str) else v)
                              if str(x).strip())
        if "presence_thresholds" in ov:
            pt = ov["presence_thresholds"]
            if pt and not all(isinstance(t, tuple) and len(t) == 3 for t in pt):
                ov["presence_thresholds"] = parse_presence_thresholds(pt)
            else:
                ov["presence_thresholds"] = tuple(pt or ())
        base = CompareSettings(**{**asdict(base), **ov})
    s = base
    problems = Problems()
    prep = prepare(slides, design=design, settings=s, problems=problems)
    if not prep.markers:
        raise InputError(f"{prep.inputs['slides_name']}: no marker has a usable metric "
                         "column; nothing to compare")
    if len(prep.timepoints) > 2:
        problems.add("multiple_timepoints",
                     f"{len(prep.timepoints)} timepoints: every later timepoint is compared with "
                     f"the baseline {prep.timepoints[0]!r} ("
                     + ", ".join(f"{t} vs {prep.timepoints[0]}" for t in prep.timepoints[1:])
                     + "); no comparison between later timepoints", severity="info")
    paired = build_paired(prep, s, problems)
    stats_t = build_stats(paired, prep, s)
    groups_t = build_group_tests(paired, prep, s, problems)
    presence = build_presence(paired, prep, s, problems)
    corr = build_correlations(paired, prep, s)
    import matplotlib
    import numpy
    import scipy

    prov = {
        "biopsyquant_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": prep.inputs,
        "settings": s.to_dict(),
        "timepoints": prep.timepoints,
        "timepoints_inferred": prep.timepoints_inferred,
        "python": platform.python_version(),
        "numpy": numpy.__version__, "scipy": scipy.__version__, "pandas": pd.__version__,
        "matplotlib": matplotlib.__version__,
    }
    return ComparisonResult(
        paired=paired, stats=stats_t, group_tests=groups_t, presence=presence,
        correlations=corr, problems=problems.frame(), sections=prep.sections,
        excluded=prep.excluded, patients=prep.patients, timepoints=prep.timepoints,
        markers=prep.markers, metrics=prep.metrics, groups=prep.groups, clinical=prep.clinical,
        settings=s, overlays=prep.overlays, provenance=prov)
