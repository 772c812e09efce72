"""``biopsyquant compare``: paired pre/post statistics, figures and an HTML report."""

from __future__ import annotations

import argparse
import sys

from ..errors import SettingsError


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``compare`` sub-command."""
    p = subparsers.add_parser(
        "compare",
        help="pair pre/post biopsies from slides.csv: statistics, figures, HTML report",
        description=(
            "Pair the biopsies of each patient across timepoints (baseline first), average "
            "replicate sections, and write paired.csv, stats.csv (median change, bootstrap CI, "
            "Wilcoxon signed-rank, Holm), group_tests.csv (Mann-Whitney U), presence.csv "
            "(Fisher exact), correlations.csv (Spearman vs clinical columns), problems.csv, "
            "figures and a self-contained report.html. With more than two timepoints every "
            "later timepoint is compared with the first."),
    )
    p.add_argument("slides", help="slides.csv from `biopsyquant score` (or any table with "
                   "patient, timepoint, marker and metric columns)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--design", help="design CSV: patient, group column, numeric clinical "
                   "columns (e.g. MMT8); optional slide/timepoint columns map slides")
    p.add_argument("--timepoints", type=_csv_list,
                   help="timepoint names in order, baseline first, e.g. baseline,month6,month12 "
                   "(default: inferred from the names, and reported)")
    p.add_argument("--markers", type=_csv_list, help="markers to analyse (default: all)")
    p.add_argument("--metrics", type=_csv_list, action="extend",
                   help="metric columns, comma-separated; METRIC or MARKER:METRIC (default: "
                   "every numeric non-identifier column)")
    p.add_argument("--group-column", default="group",
                   help="design column with the patient group (default: group)")
    p.add_argument("--clinical", type=_csv_list,
                   help="clinical columns to correlate (default: every numeric design column)")
    p.add_argument("--presence-threshold", type=_csv_list, action="extend", default=[],
                   metavar="[MARKER:]METRIC=VALUE",
                   help="presence = value > VALUE, e.g. IL-1Ra:positive_area_pct=1 (repeat the "
                   "option or separate with commas); Fisher exact test between groups at each "
                   "timepoint")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                   help="bootstrap resamples for the CI of the median change (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="confidence level of intervals (default 0.95)")
    p.add_argument("--zero-method", choices=["wilcox", "pratt", "zsplit"], default="wilcox",
                   help="zero changes in the Wilcoxon test (default wilcox: discarded, as R)")
    p.add_argument("--min-pairs", type=int, default=3,
                   help="minimum pairs for a signed-rank test (default 3)")
    p.add_argument("--min-group-size", type=int, default=3,
                   help="minimum patients per group for between-group tests (default 3)")
    p.add_argument("--min-correlation-n", type=int, default=5,
                   help="minimum patients for a correlation (default 5)")
    p.add_argument("--pseudocount", default="auto",
                   help="pseudocount of log2 fold changes: a number or 'auto' (half the "
                   "smallest positive value of the metric)")
    p.add_argument("--figure-metrics", type=_csv_list,
                   help="draw figures only for these metrics (METRIC or MARKER:METRIC)")
    p.add_argument("--no-figures", action="store_true", help="tables and report only")
    p.add_argument("--overlays", choices=["auto", "embed", "link", "none"], default="auto",
                   help="QC overlays in report.html (auto: embed up to 25 MB, else link)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when any data problem of severity 'error' exists")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the comparison; returns the exit code."""
    from ..compare import CompareSettings, compare_slides, parse_presence_thresholds, write_report

    if args.pseudocount == "auto":
        pseudo: float | str = "auto"
    else:
        try:
            pseudo = float(args.pseudocount)
        except ValueError:
            raise SettingsError(f"--pseudocount must be 'auto' or a number, got "
                                f"{args.pseudocount!r}") from None
    settings = CompareSettings(
        timepoints=tuple(args.timepoints) if args.timepoints else None,
        markers=tuple(args.markers) if args.markers else None,
        metrics=tuple(args.metrics) if args.metrics else None,
        group_column=args.group_column,
        clinical_columns=tuple(args.clinical) if args.clinical else None,
        presence_thresholds=parse_presence_thresholds(args.presence_threshold),
        n_bootstrap=args.bootstrap, seed=args.seed, confidence_level=args.confidence,
        zero_method=args.zero_method, min_pairs=args.min_pairs,
        min_group_size=args.min_group_size, min_correlation_n=args.min_correlation_n,
        pseudocount=pseudo,
    )
    result = compare_slides(args.slides, design=args.design, settings=settings)
    report = write_report(result, args.out, figures=not args.no_figures,
                          figure_metrics=args.figure_metrics, overlays=args.overlays,
                          progress=sys.stderr.isatty())
    pr = result.problems
    n_err = int((pr["severity"] == "error").sum()) if len(pr) else 0
    n_warn = int((pr["severity"] == "warning").sum()) if len(pr) else 0
    n_pairs = int(result.paired.filter(like="change_").notna().any(axis=1).sum())
    print(f"compared {result.patients.shape[0]} patients, {len(result.markers)} marker(s), "
          f"timepoints {' -> '.join(result.timepoints)}; {n_pairs} paired patient x metric rows")
    print(f"report: {report}")
    if n_err or n_warn:
        print(f"data problems: {n_err} error(s), {n_warn} warning(s) (see "
              f"{report.parent / 'problems.csv'})", file=sys.stderr)
        for _, r in pr[pr["severity"] == "error"].head(10).iterrows():
            print(f"  error: {r['message']}", file=sys.stderr)
        if n_err > 10:
            print(f"  ... {n_err - 10} more", file=sys.stderr)
    return 1 if (args.strict and n_err) else 0
