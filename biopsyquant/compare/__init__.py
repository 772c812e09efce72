"""Pre/post biopsy comparison: pairing, paired statistics, group tests, figures and an HTML report.

>>> from biopsyquant.compare import compare_slides, write_report
>>> result = compare_slides("slides.csv", design="design.csv",
...                         timepoints=("baseline", "month6"))      # doctest: +SKIP
>>> write_report(result, "compare_out")                            # doctest: +SKIP

See ``docs/compare.md`` for the tables' columns and every statistical choice.
"""

from ._api import CompareSettings, ComparisonResult, compare_slides, parse_presence_thresholds
from ._cohort import SyntheticCohort, cohort_slides, synthetic_cohort
from ._stats import (
    fisher_presence,
    holm,
    mann_whitney,
    median_bootstrap_ci,
    spearman_with_ci,
    wilcoxon_signed_rank,
)

__all__ = [
    "CompareSettings",
    "ComparisonResult",
    "SyntheticCohort",
    "cohort_slides",
    "compare_slides",
    "fisher_presence",
    "holm",
    "mann_whitney",
    "median_bootstrap_ci",
    "parse_presence_thresholds",
    "spearman_with_ci",
    "synthetic_cohort",
    "wilcoxon_signed_rank",
    "write_report",
]


def __getattr__(name: str):
    # write_report pulls in matplotlib; import it lazily
    if name == "write_report":
        from ._report import write_report

        return write_report
    raise AttributeError(name)
