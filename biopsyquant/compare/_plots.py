"""Figures of a comparison (matplotlib, Agg backend): slope plots, change distributions, scatters.

Each function returns a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes PNG/SVG and
closes it.  Nothing here touches pyplot's global state, so it is safe in threads and tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["metric_label", "slope_figure", "change_figure", "correlation_figure", "save_figure",
           "safe_name"]

#: colour-blind-safe palette (Okabe & Ito), first colours for the first groups
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
           "#000000"]
NO_GROUP = "#7f7f7f"

_KNOWN = {
    "cells_positive": "positive cells (count)",
    "cells_per_mm2": "positive cells per mm² of tissue",
    "cells_per_100_fibers": "positive cells per 100 fibers",
    "cells_per_mm2_endomysial": "endomysial positive cells per mm²",
    "cells_per_mm2_perimysial": "perimysial positive cells per mm²",
    "cells_per_mm2_perivascular": "perivascular positive cells per mm²",
    "h_score_cells": "H-score over cells (0–300)",
    "fibers_scored": "fibers scored (count)",
    "fibers_positive_pct": "positive fibers (% of fibers)",
    "mhc_grade_0_5": "MHC-I grade (0–5)",
    "positive_area_pct": "DAB-positive area (% of tissue)",
    "weak_area_pct": "weak (1+) area (% of tissue)",
    "moderate_area_pct": "moderate (2+) area (% of tissue)",
    "strong_area_pct": "strong (3+) area (% of tissue)",
    "h_score": "H-score over pixels (0–300)",
    "dab_mean_od": "mean DAB OD (log10 units)",
    "positive_area_pct_fibers": "DAB-positive area in fibers (% of fiber area)",
    "positive_area_pct_interstitium": "DAB-positive area in interstitium (% of interstitium)",
    "tissue_area_mm2": "tissue area (mm²)",
    "n_fibers": "fibers (count)",
}

_SUFFIX_UNITS = [
    (r"_per_mm2$", "per mm²"), (r"_per_100_fibers$", "per 100 fibers"), (r"_pct$", "%"),
    (r"_mm2$", "mm²"), (r"_um2$", "µm²"), (r"_um$", "µm"), (r"_od$", "OD, log10 units"),
    (r"_s$", "s"), (r"_0_5$", "0–5"),
]


def metric_label(metric: str) -> str:
    """Axis label with units for a metric column name.

    >>> metric_label("cells_per_mm2")
    'positive cells per mm² of tissue'
    >>> metric_label("capillaries_positive_pct")
    'capillaries positive (%)'
    """
    if metric in _KNOWN:
        return _KNOWN[metric]
    for pat, unit in _SUFFIX_UNITS:
        if re.search(pat, metric):
            stem = re.sub(pat, "", metric).replace("_", " ")
            return f"{stem} ({unit})"
    return metric.replace("_", " ")


def safe_name(*parts: str) -> str:
    """File-name-safe join of parts (``"CD163", "cells_per_mm2" -> "CD163_cells_per_mm2"``)."""
    return "_".join(re.sub(r"[^A-Za-z0-9._+-]+", "-", str(p)).strip("-") for p in parts)


def group_colors(groups: list[str]) -> dict[str, str]:
    """Colour per group name ('' = no group → grey)."""
    out = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    out[""] = NO_GROUP
    return out


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "NA"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def slope_figure(paired: pd.DataFrame, *, marker: str, metric: str, timepoints: list[str],
                 groups: list[str], stats: pd.DataFrame | None = None,
                 thresholds: tuple[float, ...] = (), max_labels: int = 20) -> Figure:
    """Paired slope plot: one line per patient across timepoints, coloured by group.

    Thick lines are group medians.  Patients with a single timepoint are drawn as lone points.
    ``thresholds`` (presence thresholds of this metric) are drawn as dotted lines.  With at
    most ``max_labels`` patients each line is labelled with the patient id at its last point.
    """
    sub = paired[(paired["marker"] == marker) & (paired["metric"] == metric)]
    colors = group_colors(groups)
    fig = _new_figure(max(6.0, 1.6 * len(timepoints) + 4.2), 4.6)
    ax = fig.add_subplot()
    x = np.arange(len(timepoints), dtype=float)
    rng = np.random.default_rng(0)
    alpha = float(np.clip(2.2 / np.sqrt(max(len(sub), 1)), 0.15, 0.6))
    label_patients = len(sub) <= max_labels
    labels: list[tuple[int, float, float, str, str]] = []
    for _, r in sub.iterrows():
        y = np.array([r[f"value_{tp}"] for tp in timepoints], dtype=float)
        jit = rng.uniform(-0.04, 0.04)
        c = colors.get(r["group"], NO_GROUP)
        ok = np.isfinite(y)
        ax.plot(x[ok] + jit, y[ok], "-o", color=c, alpha=alpha, lw=1.2, ms=4.5)
        if label_patients and ok.any():
            last = int(np.flatnonzero(ok)[-1])
            labels.append((last, float(y[last]), x[last] + jit, str(r["patient"]), c))
    handles = []
    for g in [*groups, ""]:
        gs = sub[sub["group"] == g]
        if gs.empty:
            continue
        med = [np.nanmedian(gs[f"value_{tp}"].to_numpy(float))
               if gs[f"value_{tp}"].notna().any() else np.nan for tp in timepoints]
        c = colors[g]
        if groups:
            ax.plot(x, med, "-", color=c, lw=3.2, alpha=0.95, solid_capstyle="round", zorder=5,
                    path_effects=[patheffects.Stroke(linewidth=5.5, foreground="white"),
                                  patheffects.Normal()])
        label = f"{g or 'no group'} (n={len(gs)})"
        handles.append(Line2D([0], [0], color=c, lw=2.5, label=label))
    ax.set_xticks(x, timepoints)
    ax.set_xlim(-0.35, len(timepoints) - (0.5 if label_patients else 0.65))
    ax.set_xlabel("timepoint")
    ax.set_ylabel(metric_label(metric))
    title = f"{marker}: {metric_label(metric)}"
    if stats is not None and len(timepoints) == 2:
        st = stats[(stats["marker"] == marker) & (stats["metric"] == metric)
                   & (stats["subset"] == "all")]
        if len(st):
            s0 = st.iloc[0]
            title += (f"\nall patients: median change {s0['median_change']:.3g}, "
                      f"Wilcoxon p = {_fmt_p(s0['wilcoxon_p'])} (n = {s0['n_pairs']} pairs)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(bottom=min(0.0, float(np.nanmin(
        sub[[f"value_{tp}" for tp in timepoints]].to_numpy(float))) if len(sub) else 0.0))
    if labels:
        _place_labels(ax, labels)
    for thr in thresholds:
        ax.axhline(thr, color="0.25", lw=1.0, ls=":")
        handles.append(Line2D([0], [0], color="0.25", lw=1.0, ls=":",
                              label=f"presence threshold ({thr:g})"))
    if handles:
        extra = [Line2D([0], [0], color="0.3", lw=1, marker="o", ms=4, alpha=0.6,
                        label="one patient")]
        if groups:
            extra.append(Line2D([0], [0], color="0.3", lw=3.2, label="group median"))
        ax.legend(handles=handles + extra, fontsize=8, frameon=False, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
    return fig


def _place_labels(ax, labels: list[tuple[int, float, float, str, str]]) -> None:
    """Patient ids right of each line's last point, pushed apart vertically to stay legible."""
    lo, hi = ax.get_ylim()
    gap = 0.038 * (hi - lo)
    for col in sorted({lab[0] for lab in labels}):
        group = sorted((lab for lab in labels if lab[0] == col), key=lambda t: t[1])
        ys = np.array([g[1] for g in group])
        adj = ys.copy()
        for i in range(1, adj.size):
            adj[i] = max(adj[i], adj[i - 1] + gap)
        adj -= max(0.0, (adj - ys).mean())  # re-centre the stack on the points
        adj[0] = max(adj[0], lo + 0.5 * gap)  # keep the lowest label inside the axes
        for i in range(1, adj.size):
            adj[i] = max(adj[i], adj[i - 1] + gap)
        for (_, y, xp, text, color), ya in zip(group, adj, strict=True):
            xt = col + 0.09
            ax.text(xt, ya, text, fontsize=7, color=color, va="center", ha="left", zorder=6,
                    bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none",
                          "alpha": 0.8})
            if abs(ya - y) > 0.25 * gap:
                ax.plot([xp + 0.01, xt - 0.01], [y, ya], color=color, lw=0.5, alpha=0.7)


def change_figure(paired: pd.DataFrame, *, marker: str, metric: str, timepoints: list[str],
                  groups: list[str], group_tests: pd.DataFrame | None = None) -> Figure:
    """Box + strip plot of changes (follow-up − baseline) by group, one panel per contrast."""
    sub = paired[(paired["marker"] == marker) & (paired["metric"] == metric)]
    colors = group_colors(groups)
    follow = timepoints[1:]
    cats = groups if groups else [""]
    fig = _new_figure(max(4.4, 0.9 + 1.35 * len(cats)) * len(follow), 4.6)
    axes = fig.subplots(1, len(follow), squeeze=False, sharey=True)[0]
    rng = np.random.default_rng(1)
    for ax, tp in zip(axes, follow, strict=True):
        data, labels = [], []
        for g in cats:
            v = sub.loc[sub["group"] == g if groups else slice(None), f"change_{tp}"]
            v = v.dropna().to_numpy(float)
            data.append(v)
            labels.append(f"{g or 'all patients'}\n(n={v.size})")
        pos = np.arange(len(cats), dtype=float)
        nonempty = [i for i, d in enumerate(data) if d.size]
        if nonempty:
            bp = ax.boxplot([data[i] for i in nonempty], positions=pos[nonempty], widths=0.5,
                            showfliers=False, patch_artist=True)
            for patch, i in zip(bp["boxes"], nonempty, strict=True):
                patch.set_facecolor(colors.get(cats[i], NO_GROUP))
                patch.set_alpha(0.25)
            for med in bp["medians"]:
                med.set_color("black")
        for i, (g, d) in enumerate(zip(cats, data, strict=True)):
            ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=22,
                       color=colors.get(g, NO_GROUP), zorder=3, edgecolor="white", lw=0.5)
        ax.axhline(0, color="0.4", lw=0.8, ls="--")
        ax.set_xticks(pos, labels)
        ax.set_xlim(-0.6, len(cats) - 0.4)
        t = f"{tp} − {timepoints[0]}"
        if group_tests is not None and len(groups) == 2:
            gt = group_tests[(group_tests["marker"] == marker) & (group_tests["metric"] == metric)
                             & (group_tests["contrast"] == f"{tp} vs {timepoints[0]}")]
            if len(gt):
                g0 = gt.iloc[0]
                t += f"\nMann–Whitney p = {_fmt_p(g0['mannwhitney_p'])}"
                if np.isfinite(g0["rank_biserial"]):
                    t += f", rank-biserial r = {g0['rank_biserial']:.2f}"
        ax.set_title(t, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"change in {metric_label(metric)}")
    fig.suptitle(f"{marker}: change per patient", fontsize=11)
    return fig


def correlation_figure(paired: pd.DataFrame, patients: pd.DataFrame, *, marker: str,
                       metric: str, clinical: str, timepoints: list[str], groups: list[str],
                       correlations: pd.DataFrame) -> Figure:
    """Scatter of the clinical column against the baseline value and against each change."""
    sub = paired[(paired["marker"] == marker) & (paired["metric"] == metric)]
    y = sub["patient"].map(patients.set_index("patient")[clinical]).to_numpy(float)
    colors = group_colors(groups)
    base = timepoints[0]
    panels = [(f"value_{base}", f"{base} {metric_label(metric)}")] + \
        [(f"change_{tp}", f"change {tp} − {base}\n{metric_label(metric)}")
         for tp in timepoints[1:]]
    fig = _new_figure(4.3 * len(panels) + (1.3 if groups else 0.0), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (col, xlabel) in zip(axes, panels, strict=True):
        x = sub[col].to_numpy(float)
        for g in [*groups, ""]:
            m = (sub["group"] == g).to_numpy()
            if m.any():
                ax.scatter(x[m], y[m], s=30, color=colors[g], edgecolor="white", lw=0.5,
                           label=g or "no group", zorder=3)
        cr = correlations[(correlations["marker"] == marker) & (correlations["metric"] == metric)
                          & (correlations["clinical"] == clinical)
                          & (correlations["variable"] == col)]
        if len(cr):
            c = cr.iloc[0]
            if np.isfinite(c["rho"]):
                ci = (f" [{c['ci_low']:.2f}, {c['ci_high']:.2f}]" if np.isfinite(c["ci_low"])
                      else "")
                txt = (f"Spearman ρ = {c['rho']:.2f}{ci}\n"
                       f"p = {_fmt_p(c['spearman_p'])}, n = {int(c['n'])}")
            else:
                txt = f"ρ: NA ({c['note']})"
            ax.set_title(txt, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(clinical)
    if groups:
        axes[-1].legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{marker} {metric_label(metric)}: correlation with {clinical}", fontsize=11)
    return fig


def save_figure(fig: Figure, path_stem: Path, *, formats: tuple[str, ...] = ("png", "svg")
                ) -> dict[str, Path]:
    """Save ``fig`` as ``<path_stem>.<fmt>`` for each format; returns the paths."""
    out = {}
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        p = path_stem.with_suffix(f".{fmt}")
        fig.savefig(p, format=fmt, dpi=130 if fmt == "png" else None,
                    metadata={"Date": None} if fmt == "svg" else None)
        out[fmt] = p
    return out
