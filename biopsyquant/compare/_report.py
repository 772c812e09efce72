"""Write a comparison's tables, figures and a self-contained HTML report."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ._api import ComparisonResult
from ._plots import (
    change_figure,
    correlation_figure,
    metric_label,
    safe_name,
    save_figure,
    slope_figure,
)

__all__ = ["write_report", "write_tables"]

#: overlays larger than this in total are linked instead of embedded (``overlays="auto"``)
EMBED_LIMIT_BYTES = 25 * 1024 * 1024

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
 padding:1em 2em;color:#222;line-height:1.4}
h1{border-bottom:2px solid #0072B2}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1em}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#f2f5f9;position:sticky;top:0}td.l,th.l{text-align:left}
tr:nth-child(even){background:#fafafa}
.sev-error{background:#fde2e1}.sev-warning{background:#fff4d6}.sev-info{background:#eef4fb}
.na{color:#a33}.fig{display:inline-block;margin:.3em;vertical-align:top}
.fig img{max-width:100%;border:1px solid #eee}
.ovl{display:inline-block;margin:.3em;text-align:center;font-size:11px;vertical-align:top}
.ovl img{max-width:340px;max-height:340px;border:1px solid #ccc;display:block;cursor:zoom-in}
.ovl img:focus{max-width:95vw;max-height:none;cursor:zoom-out;outline:2px solid #0072B2}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
code,pre{background:#f6f8fa;font-size:12px}pre{padding:.6em;overflow:auto}
.note{color:#555;font-size:13px}
"""


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        if isinstance(v, float) and np.isinf(v):
            return "inf" if v > 0 else "-inf"
        return "NA"
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


def _table(df: pd.DataFrame, *, max_rows: int | None = None, severity_col: str | None = None
           ) -> str:
    """HTML table with NA marked, text columns left-aligned."""
    if df.empty:
        return "<p class='note'>(none)</p>"
    shown = df if max_rows is None else df.head(max_rows)
    text_cols = {c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])}
    head = "".join(f"<th class='{'l' if c in text_cols else ''}'>{html.escape(str(c))}</th>"
                   for c in df.columns)
    body = []
    for _, r in shown.iterrows():
        cls = f" class='sev-{r[severity_col]}'" if severity_col else ""
        cells = []
        for c in df.columns:
            s = _fmt(r[c])
            klass = "l" if c in text_cols else ""
            if s == "NA":
                klass += " na"
            cells.append(f"<td class='{klass.strip()}'>{html.escape(s)}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    more = (f"<p class='note'>{len(df) - len(shown)} more rows in the CSV file.</p>"
            if len(shown) < len(df) else "")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _img_tag(path: Path, alt: str, *, width: str | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp",
            "svg": "image/svg+xml"}.get(path.suffix.lower().lstrip("."), "image/png")
    w = f" style='width:{width}'" if width else ""
    return f"<img src='data:{mime};base64,{data}' alt='{html.escape(alt)}'{w}>"


def write_tables(result: ComparisonResult, out_dir: str | Path) -> dict[str, Path]:
    """Write the CSV tables (``NA`` for missing values) and ``provenance.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "paired": result.paired, "stats": result.stats, "group_tests": result.group_tests,
        "presence": result.presence, "correlations": result.correlations,
        "problems": result.problems, "excluded": result.excluded,
        "sections_used": result.sections, "patients": result.patients,
    }
    paths = {}
    for name, df in files.items():
        p = out / f"{name}.csv"
        tmp = p.with_suffix(".csv.tmp")
        df.to_csv(tmp, index=False, na_rep="NA", float_format="%.10g")
        os.replace(tmp, p)
        paths[name] = p
    prov = out / "provenance.json"
    prov.write_text(json.dumps(result.provenance, indent=2, default=str), encoding="utf-8")
    paths["provenance"] = prov
    return paths


def _figures(result: ComparisonResult, fig_dir: Path, formats: tuple[str, ...],
             figure_metrics: set[str] | None, *, progress: bool = False) -> list[dict]:
    """Draw every figure; returns records (kind, marker, metric, clinical, paths)."""
    jobs: list[tuple[str, str, str, str]] = []
    for marker in result.markers:
        for metric in result.metrics[marker]:
            if figure_metrics is not None and metric not in figure_metrics and \
                    f"{marker}:{metric}" not in figure_metrics:
                continue
            jobs += [("slope", marker, metric, ""), ("change", marker, metric, "")]
            jobs += [("correlation", marker, metric, c) for c in result.clinical]
    it = jobs
    if progress and jobs:
        from tqdm.auto import tqdm

        it = tqdm(jobs, desc="figures", unit="fig", leave=False)
    recs = []
    for kind, marker, metric, clinical in it:
        if kind == "slope":
            thr = tuple(t for mk, me, t in result.settings.presence_thresholds
                        if me == metric and mk in ("", marker))
            fig = slope_figure(result.paired, marker=marker, metric=metric,
                               timepoints=result.timepoints, groups=result.groups,
                               stats=result.stats, thresholds=thr)
            stem = safe_name("slope", marker, metric)
        elif kind == "change":
            fig = change_figure(result.paired, marker=marker, metric=metric,
                                timepoints=result.timepoints, groups=result.groups,
                                group_tests=result.group_tests)
            stem = safe_name("change", marker, metric)
        else:
            fig = correlation_figure(result.paired, result.patients, marker=marker,
                                     metric=metric, clinical=clinical,
                                     timepoints=result.timepoints, groups=result.groups,
                                     correlations=result.correlations)
            stem = safe_name("corr", marker, metric, clinical)
        recs.append({"kind": kind, "marker": marker, "metric": metric, "clinical": clinical,
                     "paths": save_figure(fig, fig_dir / stem, formats=formats)})
    return recs


def _methods(result: ComparisonResult) -> str:
    s = result.settings
    base = result.baseline
    contrasts = ", ".join(f"{f} vs {b}" for f, b in result.contrasts)
    lvl = int(round(s.confidence_level * 100))
    pc = ("half the smallest positive value of that marker × metric over all biopsies"
          if s.pseudocount == "auto" else f"{s.pseudocount:g} (metric units)")
    items = [
        f"Biopsies are paired within patient. Contrast(s): {contrasts}"
        + (" — with more than two timepoints every later timepoint is compared with the "
           f"baseline ({base}); later timepoints are not compared with each other."
           if len(result.timepoints) > 2 else "."),
        "Replicate sections (several usable rows for one patient, timepoint and marker) are "
        "averaged (arithmetic mean of the sections with a value); their number is "
        "<code>n_sections_&lt;tp&gt;</code>.",
        "change = follow-up − baseline; percent change = 100·change/|baseline| (NA when the "
        "baseline is 0); log2 fold change = log2((follow-up + c)/(baseline + c)) with "
        f"pseudocount c = {pc} (column <code>log2fc_pseudocount</code>).",
        f"Median change with a {lvl}% percentile bootstrap interval ({s.n_bootstrap} resamples, "
        f"scipy.stats.bootstrap, seed {s.seed} combined with a hash of marker, metric, "
        "contrast and subset).",
        "Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided, "
        f"zero_method='{s.zero_method}'"
        + (": zero changes are discarded before ranking, as in R wilcox.test and SPSS"
           if s.zero_method == "wilcox" else "")
        + "; p-value method 'auto': exact for n ≤ 50 without ties/zeros, exhaustive "
        "permutation for n ≤ 13 with ties/zeros, normal approximation otherwise). NA when "
        f"fewer than {s.min_pairs} usable changes or all changes are zero.",
        "Holm step-down adjustment across the metrics of one marker, within one contrast and one "
        "subset (all patients, or one group); the family size is "
        "<code>holm_family_size</code>. Group comparisons use the same family definition.",
        "Between groups: two-sided Mann–Whitney U on the changes (scipy.stats.mannwhitneyu, "
        "method 'auto'); effect size rank-biserial r = 2U/(n_a·n_b) − 1 (positive: group_a's "
        f"changes larger). NA when a group has fewer than {s.min_group_size} paired patients.",
        "Presence: value &gt; threshold (setting); two-sided Fisher exact test "
        "(scipy.stats.fisher_exact) on the 2×2 table of present/absent by group at each "
        "timepoint, counting every patient with a value at that timepoint.",
        "Spearman correlation (scipy.stats.spearmanr) of the baseline value and of each change "
        f"with each numeric clinical column; {lvl}% CI by Fisher z with SE = √(1.06/(n−3)) "
        f"(Fieller et al. 1957); NA with fewer than {s.min_correlation_n} patients.",
        "p-values are not adjusted across markers, contrasts or subsets unless stated.",
    ]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _overlay_section(result: ComparisonResult, out: Path, mode: str) -> str:
    if mode == "none":
        return "<p class='note'>QC overlays not included (overlays='none').</p>"
    if not result.overlays:
        return ("<p class='note'>No QC overlays found: slides.csv has no <code>overlay</code> "
                "column and there is no <code>overlays/</code> folder next to it.</p>")
    total = sum(p.stat().st_size for p in result.overlays.values())
    embed = mode == "embed" or (mode == "auto" and total <= EMBED_LIMIT_BYTES)
    parts = [f"<p class='note'>Click an embedded overlay to enlarge it. "
             f"{len(result.overlays)} overlay image(s), "
             f"{total / 1e6:.1f} MB, " + ("embedded." if embed else
                                          "linked relative to this report (keep the folders "
                                          "together when moving it).") + "</p>"]
    sec = result.sections
    for marker in result.markers:
        parts.append(f"<h3>{html.escape(marker)}</h3>")
        ms = sec[sec["marker"] == marker]
        for pid in dict.fromkeys(ms["patient"]):
            cells = []
            for tp in result.timepoints:
                for slide in ms.loc[(ms["patient"] == pid) & (ms["timepoint"] == tp), "slide"]:
                    p = result.overlays.get(f"{slide}|{marker}")
                    cap = html.escape(f"{pid} · {tp} · {slide}")
                    if p is None:
                        cells.append(f"<div class='ovl'><em>no overlay</em><br>{cap}</div>")
                    elif embed:
                        img = _img_tag(p, cap).replace("<img ", "<img tabindex='0' ", 1)
                        cells.append(f"<div class='ovl'>{img}{cap}</div>")
                    else:
                        rel = os.path.relpath(p.resolve(), out.resolve())
                        cells.append(f"<div class='ovl'><a href='{html.escape(rel)}'>"
                                     f"<img src='{html.escape(rel)}' alt='{cap}'></a>{cap}</div>")
            parts.append(f"<div>{''.join(cells)}</div>")
    return "".join(parts)


def write_report(result: ComparisonResult, out_dir: str | Path, *, figures: bool = True,
                 figure_formats: tuple[str, ...] = ("png", "svg"),
                 figure_metrics: list[str] | None = None, overlays: str = "auto",
                 progress: bool = False) -> Path:
    """Write tables, figures and ``report.html`` into ``out_dir``.

    Parameters
    ----------
    result : ComparisonResult
    out_dir : path
        Created if needed.  Files: ``paired.csv``, ``stats.csv``, ``group_tests.csv``,
        ``presence.csv``, ``correlations.csv``, ``problems.csv``, ``excluded.csv``,
        ``sections_used.csv``, ``patients.csv``, ``provenance.json``, ``figures/*.png|svg``,
        ``report.html``.
    figures : bool
        Draw figures (slope, change, correlation per marker × metric).
    figure_formats : tuple of str
        Formats written to ``figures/`` (PNG is always drawn for the report).
    figure_metrics : list of str, optional
        Restrict figures to these metrics (``metric`` or ``MARKER:metric``); tables are complete.
    overlays : {"auto", "embed", "link", "none"}
        QC overlays in the report: ``auto`` embeds them when they total at most 25 MB, else
        links them by relative path.
    progress : bool
        Progress bar (tqdm, stderr) while drawing figures.

    Returns
    -------
    Path
        The report file.
    """
    if overlays not in ("auto", "embed", "link", "none"):
        raise InputError(f"overlays must be 'auto', 'embed', 'link' or 'none', got {overlays!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    write_tables(result, out)
    fmts = tuple(dict.fromkeys(("png", *figure_formats)))
    fig_dir = out / "figures"
    if fig_dir.is_dir():  # figures of an earlier run into the same folder would mislead
        for old in fig_dir.iterdir():
            if old.is_file() and old.name.startswith(("slope_", "change_", "corr_")) and \
                    old.suffix in (".png", ".svg"):
                old.unlink()
    figs = _figures(result, fig_dir, fmts,
                    set(figure_metrics) if figure_metrics else None,
                    progress=progress) if figures else []

    r = result
    prov = r.provenance
    sinfo = prov.get("inputs", {}).get("slides", {})
    dinfo = prov.get("inputs", {}).get("design")
    n_err = int((r.problems["severity"] == "error").sum()) if len(r.problems) else 0
    n_warn = int((r.problems["severity"] == "warning").sum()) if len(r.problems) else 0
    n_pat = r.patients.shape[0]
    vc = r.patients["group"].value_counts()
    grp_counts = {g: int(vc[g]) for g in r.groups}
    if "" in vc.index:
        grp_counts["no group"] = int(vc[""])
    h: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>biopsyquant pre/post comparison</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Pre/post biopsy comparison</h1>",
        f"<p>biopsyquant {html.escape(str(prov.get('biopsyquant_version', '')))} · created "
        f"{html.escape(str(prov.get('created_utc', '')))} · input "
        f"<code>{html.escape(str(sinfo.get('path') or prov.get('inputs', {}).get('slides_name')))}"
        f"</code></p>",
        "<h2>Summary</h2><ul>",
        f"<li>{n_pat} patients"
        + (" (" + ", ".join(f"{html.escape(str(g))}: {n}" for g, n in grp_counts.items()) + ")"
           if r.groups else "") + f"; {len(r.sections)} slide rows used, "
        f"{len(r.excluded)} excluded.</li>",
        f"<li>Timepoints in order: <b>{html.escape(' → '.join(r.timepoints))}</b>"
        + (" (order inferred from the names)" if prov.get("timepoints_inferred") else "")
        + "; contrasts: " + ", ".join(html.escape(f"{f} vs {b}") for f, b in r.contrasts)
        + (". With more than two timepoints every later timepoint is compared with the "
           "baseline." if len(r.timepoints) > 2 else ".") + "</li>",
        "<li>Markers and metrics: " + "; ".join(
            f"{html.escape(m)} ({', '.join(html.escape(x) for x in r.metrics[m])})"
            for m in r.markers) + "</li>",
        f"<li>Data problems: {n_err} error(s), {n_warn} warning(s) — see "
        "<a href='#problems'>Data problems</a>.</li></ul>",
    ]
    # per-patient direction overview (first metric of each marker)
    h.append("<h2>Direction of change per patient</h2><p class='note'>For each marker's first "
             "metric; all metrics are in <code>paired.csv</code>.</p>")
    for m in r.markers:
        metric = r.metrics[m][0]
        p = r.paired[(r.paired["marker"] == m) & (r.paired["metric"] == metric)]
        cols = ["patient", "group"] + [f"value_{t}" for t in r.timepoints] + \
            [c for t in r.timepoints[1:] for c in (f"change_{t}", f"direction_{t}")] + ["note"]
        h.append(f"<h3>{html.escape(m)} — {html.escape(metric_label(metric))}</h3>")
        h.append(_table(p[cols]))

    h.append("<h2>Paired change statistics</h2>")
    h.append(_table(r.stats[["marker", "metric", "contrast", "subset", "n_pairs", "n_increase",
                             "n_decrease", "n_zero_change", "median_baseline",
                             "median_followup", "median_change", "change_ci_low",
                             "change_ci_high", "wilcoxon_p", "p_holm", "holm_family_size",
                             "note"]]))
    h.append("<h2>Between groups</h2>")
    if r.group_tests.empty:
        h.append("<p class='note'>No between-group tests: fewer than two groups (give a design "
                 f"file with a <code>{html.escape(r.settings.group_column)}</code> column).</p>")
    else:
        h.append(_table(r.group_tests[["marker", "metric", "contrast", "group_a", "group_b",
                                       "n_a", "n_b", "median_change_a", "median_change_b",
                                       "mannwhitney_u", "mannwhitney_p", "rank_biserial",
                                       "p_holm", "note"]]))
    h.append("<h3>Presence / absence</h3>")
    if r.presence.empty:
        h.append("<p class='note'>No presence threshold set (<code>--presence-threshold "
                 "MARKER:metric=value</code>).</p>")
    else:
        h.append(_table(r.presence[["marker", "rule", "timepoint", "counts", "odds_ratio",
                                    "fisher_p", "note"]]))
    h.append("<h2>Correlations with clinical variables</h2>")
    if r.correlations.empty:
        h.append("<p class='note'>No numeric clinical column in the design.</p>")
    else:
        h.append(_table(r.correlations[["marker", "metric", "variable", "clinical", "n", "rho",
                                        "ci_low", "ci_high", "spearman_p", "note"]]))

    if figs:
        h.append("<h2>Figures</h2><p class='note'>PNG shown; SVG files are in "
                 "<code>figures/</code>.</p>")
        for m in r.markers:
            mf = [f for f in figs if f["marker"] == m]
            if not mf:
                continue
            h.append(f"<h3>{html.escape(m)}</h3>")
            for f in mf:
                alt = f"{f['kind']} {m} {f['metric']} {f['clinical']}".strip()
                h.append(f"<div class='fig'>{_img_tag(f['paths']['png'], alt)}</div>")

    h.append("<h2 id='problems'>Data problems</h2>")
    h.append("<p class='note'>Every row left out or value set to NA is listed here (also "
             "<code>problems.csv</code>; excluded slides in <code>excluded.csv</code>).</p>")
    h.append(_table(r.problems, severity_col="severity"))

    h.append("<details><summary>Paired values (all metrics)</summary>")
    h.append(_table(r.paired.drop(columns=[c for c in r.paired.columns
                                           if c.startswith("slides_")])))
    h.append("</details>")

    h.append("<h2>QC overlays</h2>")
    h.append(_overlay_section(r, out, overlays))

    h.append("<h2>Methods</h2>")
    h.append(_methods(r))
    h.append("<h2>Provenance</h2><ul>")
    h.append(f"<li>slides: <code>{html.escape(str(sinfo.get('path')))}</code>, SHA-256 "
             f"<code>{html.escape(str(sinfo.get('sha256')))}</code>, {sinfo.get('rows')} rows"
             "</li>")
    if dinfo:
        h.append(f"<li>design: <code>{html.escape(str(dinfo.get('path')))}</code>, SHA-256 "
                 f"<code>{html.escape(str(dinfo.get('sha256')))}</code></li>")
    h.append("<li>software: " + ", ".join(
        f"{k} {html.escape(str(prov.get(k)))}" for k in
        ("biopsyquant_version", "python", "numpy", "scipy", "pandas", "matplotlib")) + "</li>")
    h.append("</ul><pre>" + html.escape(json.dumps(prov.get("settings", {}), indent=2,
                                                   default=str)) + "</pre>")
    h.append("</body></html>")
    path = out / "report.html"
    tmp = out / "report.html.tmp"
    tmp.write_text("\n".join(h), encoding="utf-8")
    os.replace(tmp, path)
    return path
