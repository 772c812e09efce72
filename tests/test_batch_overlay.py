"""QC overlay pictures: the overview is written pixel for pixel, with tint, scale bar and panel."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from biopsyquant._batch_overlay import TINT, draw_overlay, render_overlay
from biopsyquant.score import ScoreResult
from biopsyquant.settings import load_settings
from biopsyquant.stains import preset


def _result(h: int = 600, w: int = 800, mpp: float | None = 0.5) -> ScoreResult:
    rng = np.random.default_rng(3)
    rgb = rng.integers(150, 250, (h, w, 3), dtype=np.uint8)
    dab = np.zeros((h, w), np.uint8)
    dab[100:200, 300:400] = 3
    dab[250:260, 300:700] = 1
    tissue = np.zeros((h, w), bool)
    tissue[50:550, 50:750] = True
    labels = {"overview_rgb": rgb, "overview_dab_class": dab, "overview_tissue": tissue}
    settings = load_settings("IL-1b")
    return ScoreResult(name="slide_a", marker=settings.marker,
                       summary={"positive_area_pct": 4.25, "h_score": 12.0},
                       cells=pd.DataFrame(), fibers=pd.DataFrame(), labels=labels,
                       settings=settings, stain_model=preset("H-DAB"), mpp=mpp,
                       mpp_source="user", warnings=[],
                       provenance={"overview_downsample": 1.0})


def _read_rgb(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]


def test_overlay_png_holds_the_drawn_overview_pixel_for_pixel(tmp_path):
    res = _result()
    drawn = draw_overlay(res)
    # tint: 0.45 * image + 0.55 * colour, truncated to uint8, only on classed pixels
    rgb = res.labels["overview_rgb"]
    want = (0.45 * rgb[150, 350].astype(np.float32)
            + 0.55 * np.asarray(TINT[3], np.float32)).astype(np.uint8)
    assert np.array_equal(drawn[150, 350], want)
    assert np.array_equal(drawn[400, 400], rgb[400, 400])  # inside tissue, no class: as is
    # tissue outline drawn just outside the tissue
    assert np.array_equal(drawn[49, 400], (0, 120, 0))

    out = render_overlay(res, tmp_path / "o.png")
    png = _read_rgb(out)
    h, w = drawn.shape[:2]
    assert png.shape == (600, 800 + 330, 3)  # overview + 330-px panel (scale 1)
    # everything outside the scale-bar corner is the drawn overview, exactly (lossless PNG)
    top = int(h * 0.85)
    assert np.array_equal(png[:top, :w], drawn[:top])
    assert np.array_equal(png[top:, w // 2:w], drawn[top:, w // 2:])
    # scale bar: 800 px × 0.5 µm / 5 = 80 µm -> a 50-µm bar = 100 px, black, from x = 24
    y0, x0 = int(round(h * 0.96)), int(round(w * 0.03))
    assert (png[y0, x0:x0 + 100] == 0).all()
    assert not (png[y0, x0 + 102:x0 + 110] == 0).all()
    # its label (drawn above the bar) darkens some pixels there
    above = png[y0 - 40:y0 - 5, x0:x0 + 100].astype(int)
    assert (above.sum(axis=2) < 200).any()
    # panel: white background with dark text in its top part
    panel = png[:, w:]
    assert (panel[-5:, -5:] == 255).all()
    assert (panel[:100].sum(axis=2) < 200).sum() > 100


def test_overlay_without_pixel_size_has_no_scale_bar_and_grows_with_large_overviews(tmp_path):
    res = _result(h=2400, w=1200, mpp=None)
    drawn = draw_overlay(res)
    png = _read_rgb(render_overlay(res, tmp_path / "big.png"))
    scale = 2400 / 1000
    assert png.shape == (2400, 1200 + int(330 * scale), 3)
    assert np.array_equal(png[:, :1200], drawn)  # no scale bar drawn over it
