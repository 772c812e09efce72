"""Export a reviewed slide in the batch schema (slides.csv, cells.csv, fibers.csv).

Also written: ``<slide>.exclusions.geojson`` (the drawn exclusions, level-0 pixel x, y; the
batch reads it from a manifest ``exclusions`` column or ``--exclusions``),
``<marker>.settings.toml`` (``biopsyquant score --settings`` reproduces the analysis) and
``run.json`` (provenance and the manual edits).

Manual edits are recorded apart from automatic detections: cells carry ``source``
(``auto``/``manual``) and ``deleted``; the slide row carries ``cells_positive_auto``,
``cells_added_manual`` and ``cells_deleted_manual`` next to the corrected counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from biopsyquant import __version__
from biopsyquant._atomic import atomic_write_text

if TYPE_CHECKING:
    from ._session import ReviewSession


#: columns of the slide row that record the review (after the batch's summary columns)
REVIEW_COLUMNS = ["cells_positive_auto", "cells_deleted_manual", "cells_added_manual",
                  "manual_review", "settings_digest"]


def _name_fields(name: str) -> dict:
    """patient / timepoint parsed from the slide name as the batch's default pattern does."""
    from biopsyquant._batch_inputs import DEFAULT_PATTERN, compile_pattern

    m = compile_pattern(DEFAULT_PATTERN).match(name)
    fields = {k: v for k, v in (m.groupdict() if m else {}).items() if k != "marker"}
    return {"patient": fields.get("patient", ""), "timepoint": fields.get("timepoint", "")}


def session_tables(session: ReviewSession) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(slides, cells, fibers) tables of a reviewed session, in the batch CLI's column order.

    ``slides`` has the batch's leading columns (``SLIDE_LEAD_COLUMNS``), the marker's summary
    columns (corrected when cells were edited), the review columns (``REVIEW_COLUMNS``) and
    ``warnings`` last; ``cells`` and ``fibers`` start with ``slide, marker`` as in the batch,
    and cells carry ``source`` (auto/manual) and ``deleted``.
    """
    from biopsyquant.batch import SLIDE_LEAD_COLUMNS, _integer_columns

    res = session._require_result()
    summary = session.summary()
    path = str(Path(session.path).absolute()) if session.path else ""
    row = {"slide": session.name, "path": path, **_name_fields(session.name),
           "marker": res.marker, "status": "ok", "error": ""}
    row.update({k: v for k, v in summary.items() if k not in ("slide", "marker")})
    row.update({"manual_review": True, "settings_digest": res.settings.digest(),
                "warnings": " | ".join(res.warnings)})
    slides = pd.DataFrame([row])
    lead = [c for c in SLIDE_LEAD_COLUMNS if c in slides.columns]
    tail = [c for c in REVIEW_COLUMNS if c in slides.columns] + ["warnings"]
    rest = [c for c in slides.columns if c not in lead and c not in tail]
    slides = _integer_columns(slides[lead + rest + tail])
    cells = session.cells_table()
    fibers = res.fibers.copy()
    for df in (cells, fibers):
        df.insert(0, "marker", res.marker)
        df.insert(0, "slide", session.name)
    return slides, cells, fibers


def export_session(session: ReviewSession, out_dir: Path) -> dict[str, Path]:
    """Write the tables, the exclusions GeoJSON and provenance into ``out_dir`` (atomic)."""
    session._require_result()
    out_dir.mkdir(parents=True, exist_ok=True)
    slides, cells, fibers = session_tables(session)
    written = {
        "slides": atomic_write_text(out_dir / "slides.csv", slides.to_csv(index=False)),
        "cells": atomic_write_text(out_dir / "cells.csv", cells.to_csv(index=False)),
        "fibers": atomic_write_text(out_dir / "fibers.csv", fibers.to_csv(index=False)),
    }
    if session.exclusions:
        from biopsyquant.tissue import save_exclusions

        path = out_dir / f"{session.name}.exclusions.geojson"
        save_exclusions(session.exclusions, path)
        written["exclusions"] = path
    res = session.result
    # the settings as a TOML file: `biopsyquant score --settings FILE` reproduces them
    written["settings"] = atomic_write_text(out_dir / f"{res.marker}.settings.toml",
                                            res.settings.to_toml())
    prov = {
        "biopsyquant_version": __version__,
        "source": "napari review",
        "slide": session.name,
        "path": session.path,
        "settings": res.settings.to_dict(),
        "settings_digest": res.settings.digest(),
        "stain_model": res.stain_model.to_dict(),
        "mpp": session.mpp,
        "mpp_source": session.mpp_source,
        "manual_edits": {"deleted_cell_ids": sorted(int(i) for i in session.deleted),
                         "added_cells_xy_px": [list(p) for p in session.added]},
        "warnings": res.warnings,
    }
    written["run"] = atomic_write_text(out_dir / "run.json", json.dumps(prov, indent=2,
                                                                         default=str))
    return written
