"""Collect data problems found while reading and pairing, for ``problems.csv`` and the report."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

#: columns of problems.csv, in order
PROBLEM_COLUMNS = ["severity", "kind", "patient", "timepoint", "marker", "slide", "metric",
                   "message"]

#: severity levels: ``error`` = data excluded, ``warning`` = result weakened or NA,
#: ``info`` = something the reader should know (e.g. inferred timepoint order)
SEVERITIES = ("error", "warning", "info")


@dataclass
class Problems:
    """Mutable list of problems; converted to a table with :meth:`frame`."""

    rows: list[dict] = field(default_factory=list)

    def add(self, kind: str, message: str, *, severity: str = "warning", patient: str = "",
            timepoint: str = "", marker: str = "", slide: str = "", metric: str = "") -> None:
        """Record one problem.  ``kind`` is a short snake_case tag (see docs/compare.md)."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        self.rows.append({"severity": severity, "kind": kind, "patient": str(patient),
                          "timepoint": str(timepoint), "marker": str(marker),
                          "slide": str(slide), "metric": str(metric), "message": message})

    def frame(self) -> pd.DataFrame:
        """Problems as a DataFrame with :data:`PROBLEM_COLUMNS`, errors first."""
        df = pd.DataFrame(self.rows, columns=PROBLEM_COLUMNS)
        if df.empty:
            return df.astype(str)
        order = {s: i for i, s in enumerate(SEVERITIES)}
        df["_o"] = df["severity"].map(order)
        df = df.sort_values(["_o"], kind="stable").drop(columns="_o").reset_index(drop=True)
        return df
