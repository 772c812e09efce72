"""Flat-field (uneven illumination) correction: fit against the generator's known field,
decisions, tiling invariance and provenance."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from biopsyquant.errors import SettingsError
from biopsyquant.illumination import FlatField, IlluminationParams, fit_flat_field
from biopsyquant.settings import load_settings
from biopsyquant.synthetic import generate_section

SHAPE = (768, 768)
MPP = 0.5


def _section(illumination: float, **kw):
    # noise and JPEG off: the ratio of two renderings is then the illumination field itself
    opts = {"noise": 0.0, "jpeg_quality": None, "marker": "IL-1b", "seed": 11, "shape": SHAPE,
            "mpp": MPP, "expression": 0.3}
    opts.update(kw)
    return generate_section(illumination=illumination, **opts)


@pytest.fixture(scope="module")
def lit():
    return _section(0.10)


@pytest.fixture(scope="module")
def flat():
    return _section(0.0)


def _log_ratio(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64).mean(axis=2)[mask]
    b = b.astype(np.float64).mean(axis=2)[mask]
    return np.log10(np.maximum(a, 1) / np.maximum(b, 1))


def test_fit_recovers_the_generators_field(lit, flat):
    """After correction the image is the evenly lit rendering times one constant (within
    0.4 % rms over bright pixels, tissue included); before it varied by ~1.8 % rms."""
    ff = fit_flat_field(lit.rgb, mpp=MPP)
    assert ff.applied, ff.reason
    assert ff.reason.startswith("corrected")
    bright = flat.rgb.astype(np.int16).sum(axis=2) > 3 * 150
    before = _log_ratio(lit.rgb, flat.rgb, bright)
    after = _log_ratio(ff.apply(lit.rgb), flat.rgb, bright)
    assert before.std() > 0.006               # ~1.8 % rms: the field is really there
    assert after.std() < 0.0017, after.std()  # < 0.4 % rms left
    # the correction only darkens (no clipping at 255): every factor <= 1
    fy, fx = ff.factors((0, 0, SHAPE[1], SHAPE[0]))
    assert fy.max() <= 1.0 and fx.max() <= 1.0
    assert 0 < ff.max_correction_pct() < 15


def test_h_score_error_shrinks_with_the_correction(lit):
    """IL-1b seed 11 at expression 0.3: the H-score against the true DAB map moves from
    about -14 % (one background for an unevenly lit field) to within 10 %."""
    from biopsyquant.score import score_image

    sec = generate_section(marker="IL-1b", seed=11, shape=(1024, 1024), mpp=MPP, expression=0.3,
                           vector_jitter_deg=3.0, illumination=0.1, jpeg_quality=85)
    v = sec.dab_od[sec.tissue]
    truth = (np.count_nonzero(v >= 0.2) + np.count_nonzero(v >= 0.4)
             + np.count_nonzero(v >= 0.6)) / v.size * 100
    on = score_image(sec.rgb, marker="IL-1b", mpp=MPP)
    off = score_image(sec.rgb, settings=load_settings(
        "IL-1b", overrides={"illumination.flat_field": "off"}), mpp=MPP)
    err_on = (on.summary["h_score"] / truth - 1) * 100
    err_off = (off.summary["h_score"] / truth - 1) * 100
    assert err_off < -12, err_off
    assert abs(err_on) < 10, err_on
    assert on.provenance["illumination"]["applied"] is True
    assert off.provenance["illumination"]["applied"] is False
    assert "off" in off.provenance["illumination"]["reason"]
    assert 5 < on.summary["flat_field_max_pct"] < 15 and off.summary["flat_field_max_pct"] == 0


def test_no_correction_without_glass_or_without_a_gradient(flat):
    full = generate_section(marker="CD163", seed=2, shape=(512, 512), mpp=MPP,
                            illumination=0.1, tissue_coverage=1.0)
    ff = fit_flat_field(full.rgb, mpp=MPP)
    assert not ff.applied
    assert np.array_equal(ff.apply(full.rgb), full.rgb)
    ff0 = fit_flat_field(flat.rgb, mpp=MPP)
    assert not ff0.applied and ff0.reason.startswith("flat"), ff0.reason
    plain = np.full((300, 400, 3), 235, np.uint8)  # only glass, perfectly even
    assert not fit_flat_field(plain, mpp=MPP).applied


def test_glass_on_one_side_is_not_extrapolated():
    """Tissue everywhere but a strip of glass along one edge: the fit would extrapolate a
    paraboloid across the tissue, so it is refused (standard-error rule)."""
    sec = generate_section(marker="CD163", seed=3, shape=(512, 512), mpp=MPP,
                           illumination=0.1, tissue_coverage=1.0, noise=0.0)
    rgb = sec.rgb.copy()
    rgb[:, :40] = (236, 236, 238)  # a strip of even glass, 20 µm... + margin
    rgb[:, :40] = np.clip(rgb[:, :40].astype(int) - np.arange(512)[:, None, None] // 64,
                          0, 255).astype(np.uint8)  # with a vertical gradient in it
    ff = fit_flat_field(rgb, mpp=MPP)
    assert not ff.applied, ff.reason


def test_tiles_are_corrected_exactly_like_the_whole(lit):
    ff = fit_flat_field(lit.rgb, mpp=MPP)
    whole = ff.apply(lit.rgb)
    a = ff.apply(lit.rgb[100:400, 50:700], origin=(50, 100))
    b = ff.apply(lit.rgb[400:, :], origin=(0, 400))
    assert np.array_equal(a, whole[100:400, 50:700])
    assert np.array_equal(b, whole[400:, :])


def test_thumbnail_fit_matches_full_resolution_fit(lit):
    """Fitting on a 4x thumbnail in level-0 coordinates gives the same field (within 0.2 %)
    and corrects the thumbnail like the level-0 pixels it averages."""
    import cv2

    ff = fit_flat_field(lit.rgb, mpp=MPP)
    thumb = cv2.resize(lit.rgb, (SHAPE[1] // 4, SHAPE[0] // 4), interpolation=cv2.INTER_AREA)
    ft = fit_flat_field(thumb, mpp=MPP * 4, shape=SHAPE)
    assert ft.applied
    fy, fx = ff.factors((0, 0, SHAPE[1], SHAPE[0]))
    ty, tx = ft.factors((0, 0, SHAPE[1], SHAPE[0]))
    field = np.log10(np.outer(fy, fx))
    tfield = np.log10(np.outer(ty, tx))
    assert np.abs((field - field.mean()) - (tfield - tfield.mean())).max() < 0.001
    # scaled application to the thumbnail = the level-0 factors at its pixel centres
    small = ft.apply(thumb, scale=(4.0, 4.0))
    sy, sx = ft.factors((0, 0, thumb.shape[1], thumb.shape[0]), (4.0, 4.0))
    ly, lx = ft.factors((0, 0, SHAPE[1], SHAPE[0]))
    assert np.allclose(sy, ly[1::4], atol=2e-4) and np.allclose(sx, lx[1::4], atol=2e-4)
    assert small.shape == thumb.shape


def test_round_trip_and_settings():
    ff = fit_flat_field(_section(0.1, shape=(512, 512)).rgb, mpp=MPP)
    back = FlatField.from_dict(ff.to_dict())
    assert back.applied == ff.applied and np.allclose(back.coef, ff.coef)
    assert back.factors((0, 0, 9, 7))[0].tolist() == ff.factors((0, 0, 9, 7))[0].tolist()
    with pytest.raises(SettingsError, match="flat_field"):
        load_settings("CD163", overrides={"illumination.flat_field": "sometimes"})
    with pytest.raises(SettingsError, match="min_snr"):
        load_settings("CD163", overrides={"illumination.min_snr": -1})
    assert load_settings("CD163").illumination == IlluminationParams()


def test_fixed_background_is_not_fitted(lit):
    from biopsyquant.score import score_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = score_image(lit.rgb, settings=load_settings(
            "IL-1b", overrides={"stains.background": [240.0, 240.0, 240.0]}), mpp=MPP)
    assert r.provenance["illumination"]["applied"] is False
    assert "fixed" in r.provenance["illumination"]["reason"]


@pytest.mark.slow
def test_slide_whole_and_tiled_identical_with_correction(tmp_path, lit):
    """A pyramidal slide whose field is corrected: whole vs 4 tiles give identical numbers,
    and run provenance records the field."""
    from test_batch_files import write_pyramid_jpeg

    from biopsyquant.slide import open_slide
    from biopsyquant.wsi import score_slide

    path = write_pyramid_jpeg(tmp_path / "lit.tif", np.ascontiguousarray(lit.rgb), MPP, tile=256)
    settings = load_settings("IL-1b", overrides={"tiling.overlap_um": 100.0})
    with open_slide(path) as slide:
        whole = score_slide(slide, settings=settings, tiled=False)
        tiled = score_slide(slide, settings=settings, tiled=True, tile_size=384)
    assert whole.provenance["illumination"]["applied"] is True
    assert tiled.provenance["illumination"] == whole.provenance["illumination"]
    assert tiled.provenance["tiling"]["n_tiles"] == 4
    assert tiled.summary["flat_field_max_pct"] == whole.summary["flat_field_max_pct"] > 0
    for k in ("positive_area_pct", "h_score", "dab_mean_od", "n_fibers"):
        assert tiled.summary[k] == whole.summary[k], k


# ------------------------------------------------------------------ blank-field reference
def _strong_field(h: int, w: int) -> np.ndarray:
    """A cos⁴-like vignette (−25 % in the corners) with a 4 % colour cast across the field: no
    member of the fitted family."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot(xx - 0.55 * w, yy - 0.45 * h) / np.hypot(h, w)
    g = np.cos(np.arctan(r * 1.3)) ** 4
    return np.stack([g, g * (1 - 0.04 * xx / w), g * (1 - 0.02 * yy / h)], axis=2)


def test_blank_reference_corrects_any_field(tmp_path, flat):
    import tifffile

    f = _strong_field(*SHAPE)
    img = np.clip(flat.rgb * f + 0.5, 0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    blank = np.clip(np.asarray(flat.stain_model.background, np.float32) * f
                    + rng.normal(0, 1.5, f.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "blank.tif"
    tifffile.imwrite(path, blank)
    params = IlluminationParams(reference=str(path))
    ff = fit_flat_field(img, mpp=MPP, params=params)
    assert ff.applied and ff.reference == str(path) and len(ff.reference_sha256) == 64
    bright = flat.rgb.astype(np.int16).sum(axis=2) > 3 * 150
    before = _log_ratio(img, flat.rgb, bright)
    after = _log_ratio(ff.apply(img), flat.rgb, bright)
    assert before.std() > 0.02
    assert after.std() < 0.002, after.std()
    # the glass-fitted model refuses this field rather than mis-correcting it
    assert not fit_flat_field(img, mpp=MPP).applied
    # tiles: the same pixels as the whole, also after a round trip through the provenance dict
    back = FlatField.from_dict(ff.to_dict())
    assert np.array_equal(back.apply(img[200:500, 100:600], origin=(100, 200)),
                          ff.apply(img)[200:500, 100:600])
    # end to end: scored through the settings, recorded in the provenance
    from biopsyquant.score import score_image

    r = score_image(img, settings=load_settings(
        "IL-1b", overrides={"illumination.reference": str(path)}), mpp=MPP)
    assert r.provenance["illumination"]["reference_sha256"] == ff.reference_sha256
    assert r.summary["flat_field_max_pct"] > 20


def test_blank_reference_errors_name_the_file(tmp_path, flat):
    import tifffile

    from biopsyquant.errors import InputError

    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.full((100, 120, 3), 235, np.uint8))
    with pytest.raises(InputError, match=r"small\.tif is 120x100 px but the image is 768x768"):
        fit_flat_field(flat.rgb, mpp=MPP, params=IlluminationParams(reference=str(small)))
    dark = tmp_path / "dark.tif"
    tifffile.imwrite(dark, np.full(SHAPE + (3,), 40, np.uint8))
    with pytest.raises(InputError, match=r"dark\.tif is not an image of empty glass"):
        fit_flat_field(flat.rgb, mpp=MPP, params=IlluminationParams(reference=str(dark)))
    with pytest.raises(InputError, match=r"nothere\.tif: cannot read it"):
        fit_flat_field(flat.rgb, mpp=MPP,
                       params=IlluminationParams(reference=str(tmp_path / "nothere.tif")))
