"""Stain separation: exactness of the fast kernels, background and stain-vector estimation."""

from __future__ import annotations

import json
import threading
import warnings

import numpy as np
import pytest
from skimage.color import rgb2hed
from skimage.data import immunohistochemistry

from biopsyquant import _kernels
from biopsyquant.errors import InputError
from biopsyquant.stains import (
    DAB,
    HEMATOXYLIN,
    PRESETS,
    StainModel,
    ThresholdCounts,
    dab_classes,
    dab_threshold_counts,
    deconvolve,
    estimate_background,
    estimate_stains,
    load_stains,
    optical_density,
    preset,
    save_stains,
    stain_od,
)

SPEC_TOL = 1e-3  # issue #2: agree with the exact float64 reference to 1e-3 OD


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def reference_od(rgb: np.ndarray, background) -> np.ndarray:
    """Exact float64 OD, written independently of the package."""
    i = np.maximum(rgb.astype(np.float64), 1.0)
    return np.maximum(-np.log10(i / np.asarray(background, np.float64)), 0.0)


def reference_deconvolve(rgb: np.ndarray, model: StainModel) -> np.ndarray:
    return reference_od(rgb, model.background) @ np.linalg.inv(model.vectors)


def unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def rotate_towards(v, w, deg):
    """Rotate unit vector v by ``deg`` degrees in the plane of v and w (away from w if < 0)."""
    v, w = unit(v), unit(w)
    perp = unit(w - (w @ v) * v)
    a = np.radians(deg)
    return unit(np.cos(a) * v + np.sin(a) * perp)


def angle(a, b) -> float:
    return float(np.degrees(np.arccos(np.clip(unit(a) @ unit(b), -1, 1))))


def mixed_image(v_h, v_d, background, *, shape=(200, 200), dab_fraction=0.4, glass=0.3,
                seed=0) -> np.ndarray:
    """Beer-Lambert mixture of two stains on glass, with camera noise, uint8."""
    rng = np.random.default_rng(seed)
    h, w = shape
    ch = rng.gamma(2.0, 0.25, size=(h, w))
    cd = np.where(rng.random((h, w)) < dab_fraction, rng.gamma(2.0, 0.3, size=(h, w)), 0.0)
    ch *= rng.random((h, w)) < 0.9
    od = ch[..., None] * unit(v_h) + cd[..., None] * unit(v_d)
    od[:, : int(w * glass)] = 0.0  # a strip of glass
    img = np.asarray(background, float) * 10.0 ** (-od)
    img += rng.normal(0, 1.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# exactness of the fast paths
# ------------------------------------------------------------------------------------------
MODELS = [
    PRESETS["H-DAB"],
    PRESETS["H-E"],
    PRESETS["H-E-DAB"],
    StainModel(("hematoxylin", "dab", "residual"),
               np.array([[0.70, 0.65, 0.25], [0.20, 0.45, 0.85]]), (231.0, 226.5, 240.0),
               "user"),
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.source)
@pytest.mark.parametrize("shape", [(7, 13), (300, 257)], ids=["serial", "parallel"])
def test_deconvolve_matches_float64_reference(model, shape):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    n = min(256, shape[0] * shape[1])
    rgb.reshape(-1, 3)[:n] = np.arange(256, dtype=np.uint8)[-n:, None]  # bright end / all
    ref = reference_deconvolve(rgb, model)
    got = deconvolve(rgb, model)
    assert got.dtype == np.float32 and got.shape == rgb.shape
    err = np.abs(got - ref).max()
    assert err < SPEC_TOL
    assert err < 2e-5  # float32 tables: actually ~1e-6
    for s, name in enumerate(model.names):
        one = stain_od(rgb, model, name)
        assert one.shape == shape and one.dtype == np.float32
        assert np.abs(one - ref[..., s]).max() < 2e-5


def test_optical_density_reference():
    rgb = np.arange(256, dtype=np.uint8)[None, :, None].repeat(3, axis=2)
    bg = (240.0, 250.0, 200.0)
    od = optical_density(rgb, bg)
    np.testing.assert_allclose(od, reference_od(rgb, bg), atol=1e-6)
    # at the background OD is 0, brighter than background clips at 0, black caps at log10(bg)
    assert od[0, 240, 0] == 0 and od[0, 255, 0] == 0 and od[0, 200, 2] == 0
    assert od[0, 0, 1] == pytest.approx(np.log10(250.0), abs=1e-6)


def test_non_contiguous_input_and_out_buffer():
    rgb = immunohistochemistry()
    view = rgb[::2, 1::3]  # strided view, not contiguous
    model = PRESETS["H-DAB"]
    ref = reference_deconvolve(np.ascontiguousarray(view), model)
    buf = np.full(view.shape, np.nan, np.float32)
    got = deconvolve(view, model, out=buf)
    assert got is buf
    assert np.abs(got - ref).max() < 2e-5
    buf2 = np.empty(view.shape[:2], np.float32)
    assert stain_od(view, model, "dab", out=buf2) is buf2
    np.testing.assert_allclose(buf2, ref[..., 1], atol=2e-5)
    with pytest.raises(InputError, match="out"):
        deconvolve(view, model, out=np.empty((3, 3, 3), np.float32))


def test_serial_and_parallel_kernels_agree():
    rgb = immunohistochemistry()
    model = PRESETS["H-DAB"]
    from biopsyquant.stains import _deconvolution_luts

    lut = _deconvolution_luts(model)
    a = np.empty(rgb.shape, np.float32)
    b = np.empty(rgb.shape, np.float32)
    _kernels.deconvolve_into(rgb, lut, a, parallel=True)
    _kernels.deconvolve_into(rgb, lut, b, parallel=False)
    np.testing.assert_array_equal(a, b)


def test_busy_parallel_lock_falls_back_to_serial_kernel():
    rgb = immunohistochemistry()  # 262,144 px: parallel by default
    model = PRESETS["H-DAB"]
    expected = stain_od(rgb, model)
    assert _kernels._PARALLEL_LOCK.acquire(blocking=False)
    try:  # another thread "inside" a parallel kernel: this call must not wait or nest
        got = stain_od(rgb, model)
        counts = dab_threshold_counts(rgb, model)
    finally:
        _kernels._PARALLEL_LOCK.release()
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(counts.counts, dab_threshold_counts(rgb, model).counts)


def test_concurrent_calls_from_threads_are_correct():
    rgb = immunohistochemistry()
    model = PRESETS["H-DAB"]
    expected = stain_od(rgb, model)
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(stain_od(rgb, model))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 9
    for r in results:
        np.testing.assert_array_equal(r, expected)


# ------------------------------------------------------------------------------------------
# fused threshold counting
# ------------------------------------------------------------------------------------------
def test_threshold_counts_match_numpy_and_float64():
    rgb = immunohistochemistry()
    model = PRESETS["H-DAB"].with_background((225.0, 223.0, 224.0))
    thr = (0.2, 0.4, 0.6)
    dab = stain_od(rgb, model)
    cls = np.searchsorted(np.asarray(thr, np.float32), dab, side="right")
    tc = dab_threshold_counts(rgb, model, thr)
    assert isinstance(tc, ThresholdCounts)
    np.testing.assert_array_equal(tc.counts, np.bincount(cls.ravel(), minlength=4))
    # sums: each pixel's OD rounded to 2**-20 OD, so |error| <= n * 2**-21
    ref_sums = np.array([dab[cls == k].astype(np.float64).sum() for k in range(4)])
    assert np.all(np.abs(tc.od_sum - ref_sums) <= tc.counts * 2.0**-21 + 1e-9)
    assert np.abs(tc.od_sum - ref_sums).max() < 1e-2
    assert tc.total == rgb.shape[0] * rgb.shape[1]
    # against the exact float64 reference: only pixels within float32 rounding of a threshold
    # may change class, and the mean OD agrees to far better than 1e-3
    ref = reference_deconvolve(rgb, model)[..., 1]
    ref_cls = np.searchsorted(thr, ref, side="right")
    assert np.abs(tc.counts - np.bincount(ref_cls.ravel(), minlength=4)).max() <= 5
    assert tc.mean_od == pytest.approx(ref.mean(), abs=1e-6)
    # the class image says the same pixel by pixel
    img = dab_classes(rgb, model, thr)
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img, cls)


@pytest.mark.parametrize("thr", [(0.3,), (0.2, 0.5), (0.15, 0.3, 0.5, 0.8)],
                         ids=["1", "2", "4"])
def test_threshold_counts_mask_and_additivity(thr):
    rgb = immunohistochemistry()
    model = PRESETS["H-DAB"]
    mask = np.zeros(rgb.shape[:2], bool)
    mask[100:400, 50:300] = True
    k = len(thr) + 1
    whole = dab_threshold_counts(rgb, model, thr, mask)
    assert whole.counts.shape == (k,) and whole.od_sum.shape == (k,)
    assert whole.total == mask.sum()
    dab = stain_od(rgb, model)
    cls = np.searchsorted(np.float32(thr), dab[mask], side="right")
    np.testing.assert_array_equal(whole.counts, np.bincount(cls, minlength=k))
    ref_sums = np.array([dab[mask][cls == c].astype(float).sum() for c in range(k)])
    assert np.all(np.abs(whole.od_sum - ref_sums) <= whole.counts * 2.0**-21 + 1e-9)
    top = dab_threshold_counts(rgb[:256], model, thr, mask[:256])
    bottom = dab_threshold_counts(rgb[256:], model, thr, mask[256:])
    both = top + bottom
    np.testing.assert_array_equal(both.counts, whole.counts)
    np.testing.assert_array_equal(both.od_sum, whole.od_sum)  # exactly additive
    img = dab_classes(rgb, model, thr, mask, outside=9)
    assert (img[~mask] == 9).all()
    np.testing.assert_array_equal(img[mask], cls)


def test_threshold_argument_errors():
    rgb = np.zeros((4, 4, 3), np.uint8)
    model = PRESETS["H-DAB"]
    with pytest.raises(InputError, match="thresholds"):
        dab_threshold_counts(rgb, model, (0.4, 0.2))
    with pytest.raises(InputError, match="thresholds"):
        dab_threshold_counts(rgb, model, [])
    with pytest.raises(InputError, match="mask"):
        dab_threshold_counts(rgb, model, (0.2,), np.ones((3, 3), bool))
    with pytest.raises(InputError, match="not in this stain model"):
        dab_classes(rgb, PRESETS["H-E"])


@pytest.mark.parametrize(
    ("arr", "match"),
    [
        (np.zeros((4, 4, 4), np.uint8), "3 channels"),
        (np.zeros((4, 4), np.uint8), "3 channels"),
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4, 3), np.uint16), "uint8"),
    ],
)
def test_bad_images_are_refused(arr, match):
    with pytest.raises(InputError, match=match):
        deconvolve(arr, PRESETS["H-DAB"])
    with pytest.raises(InputError, match=match):
        stain_od(arr, PRESETS["H-DAB"])


def test_custom_vectors_and_singular_matrix():
    m = StainModel(("a", "b", "c"), np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]]))
    np.testing.assert_allclose(np.linalg.norm(m.vectors, axis=1), 1)
    with pytest.raises(InputError, match="linearly dependent"):
        StainModel(("a", "b", "c"), np.array([[1, 1, 0], [2, 2, 0], [0, 0, 1]]))
    with pytest.raises(InputError, match="unknown stain preset"):
        preset("H-X")


def test_residual_is_orthogonal_and_matrix_well_conditioned():
    for name in ("H-DAB", "H-E"):
        v = PRESETS[name].vectors
        assert abs(v[2] @ v[0]) < 1e-12 and abs(v[2] @ v[1]) < 1e-12
        assert np.linalg.cond(v) < 5


# ------------------------------------------------------------------------------------------
# bundled real IHC image
# ------------------------------------------------------------------------------------------
def test_skimage_ihc_image_gives_sensible_maps():
    rgb = immunohistochemistry()
    model = estimate_stains(rgb)
    assert model.source == "estimated"
    assert angle(model.vectors[0], HEMATOXYLIN) < 15
    assert angle(model.vectors[1], DAB) < 20
    conc = deconvolve(rgb, model)
    hema, dab = conc[..., 0], conc[..., 1]
    f = rgb.astype(int)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    brown = (r - b > 40) & (r > g) & (f.sum(-1) < 500)  # brown DAB precipitate
    blue = (b - r > 15) & (f.sum(-1) < 450)  # blue hematoxylin nuclei
    assert brown.sum() > 1000 and blue.sum() > 1000
    assert np.median(dab[brown]) > 0.3
    assert np.median(dab[brown]) > np.median(dab[blue]) + 0.25
    assert np.median(hema[blue]) > np.median(hema[brown]) + 0.1
    assert np.median(hema[blue]) > 0.2
    # same vectors as scikit-image on a white background: DAB maps are strongly correlated
    # (rgb2hed is natural-log OD / ln(1e-6), i.e. ~OD10/6, with eosin as third stain)
    ours = stain_od(rgb, PRESETS["H-DAB"], "dab")
    theirs = rgb2hed(rgb)[..., 2]
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.95


# ------------------------------------------------------------------------------------------
# background estimation
# ------------------------------------------------------------------------------------------
def test_estimate_background_from_glass_and_pale_tissue():
    rng = np.random.default_rng(3)
    bg = np.array([236.0, 231.0, 242.0])
    img = np.empty((240, 300, 3), float)
    img[:] = bg
    img[:, 60:] = (200.0, 185.0, 200.0)  # pale, nearly grey tissue (darker peak)
    img[:, 200:] = (150.0, 110.0, 160.0)  # stained tissue
    img += rng.normal(0, 2.0, img.shape)
    rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)
    est = estimate_background(rgb)
    np.testing.assert_allclose(est, bg, atol=1.0)
    # a tissue mask that covers the glass leaves no glass
    with pytest.warns(UserWarning, match="no glass"):
        assert estimate_background(rgb, tissue_mask=np.ones(rgb.shape[:2], bool)) == (
            255.0, 255.0, 255.0)


@pytest.mark.parametrize("glass_fraction", [0.05, 0.02])
def test_estimate_background_with_little_glass(glass_fraction):
    """A field almost filled by pale, nearly grey tissue: the small glass peak still wins."""
    rng = np.random.default_rng(0)
    h, w = 400, 400
    ng = int(w * glass_fraction)
    img = np.empty((h, w, 3))
    img[:, :ng] = (236, 231, 242)
    img[:, ng:] = (np.array([200.0, 192.0, 208.0]) + rng.normal(0, 12, (h, w - ng, 1))
                   + rng.normal(0, 3, (h, w - ng, 3)))
    img += rng.normal(0, 2, img.shape)
    rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(estimate_background(rgb), (236, 231, 242), atol=1.0)


def test_estimate_background_without_glass_warns_and_falls_back():
    rgb = np.full((64, 64, 3), (140, 90, 150), np.uint8)
    with pytest.warns(UserWarning, match="no glass"):
        assert estimate_background(rgb) == (255.0, 255.0, 255.0)


def test_estimate_background_of_skimage_ihc():
    rgb = immunohistochemistry()
    bg = np.array(estimate_background(rgb))
    # the bright, unstained areas of this image are light grey around 220
    assert np.all((bg > 205) & (bg < 240))
    assert np.ptp(bg) < 8


# ------------------------------------------------------------------------------------------
# stain estimation
# ------------------------------------------------------------------------------------------
def test_estimate_stains_recovers_known_vectors():
    v_h = rotate_towards(HEMATOXYLIN, (1.0, 0.2, 0.1), 8)  # batch drift, 8 degrees
    v_d = rotate_towards(DAB, (0.1, 0.3, 1.0), 10)
    bg = (238.0, 234.0, 244.0)
    rgb = mixed_image(v_h, v_d, bg)
    model = estimate_stains(rgb)
    assert model.source == "estimated"
    np.testing.assert_allclose(model.background, bg, atol=1.0)
    assert angle(model.vectors[0], v_h) < 2.5
    assert angle(model.vectors[1], v_d) < 2.5
    assert model.names == ("hematoxylin", "dab", "residual")
    # better than the preset it started from
    assert angle(model.vectors[1], v_d) < angle(DAB, v_d) - 5


def test_estimate_stains_falls_back_without_dab():
    rgb = mixed_image(HEMATOXYLIN, DAB, (240, 240, 240), dab_fraction=0.0)
    model = estimate_stains(rgb)
    assert model.source.startswith("preset:H-DAB (estimation failed: too few DAB pixels")
    np.testing.assert_allclose(model.vectors, PRESETS["H-DAB"].vectors)
    np.testing.assert_allclose(model.background, (240, 240, 240), atol=1.0)


def test_estimate_stains_falls_back_on_implausible_vectors():
    # a second stain 30 degrees from DAB (purple-blue absorbing): not a plausible DAB
    odd = rotate_towards(DAB, (0.3, 0.1, 1.0), 30)
    rgb = mixed_image(HEMATOXYLIN, odd, (240, 240, 240))
    model = estimate_stains(rgb)
    assert model.source.startswith("preset:H-DAB (estimation failed: DAB vector")
    assert "from the preset (max 25°)" in model.source
    np.testing.assert_allclose(model.vectors, PRESETS["H-DAB"].vectors)
    # and it is accepted when the user allows that much drift
    loose = estimate_stains(rgb, max_angle=40)
    assert loose.source == "estimated" and angle(loose.vectors[1], odd) < 3


def test_estimate_stains_blank_image_and_three_stain_base():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blank = np.full((50, 50, 3), 245, np.uint8)
        model = estimate_stains(blank)
    assert "too few stained tissue pixels" in model.source
    three = estimate_stains(blank, base="H-E-DAB", background=(245, 245, 245))
    assert three.source.startswith("preset:H-E-DAB (not estimated")
    assert three.background == (245.0, 245.0, 245.0)
    np.testing.assert_allclose(three.vectors, PRESETS["H-E-DAB"].vectors)


def test_estimate_stains_uses_tissue_mask_only():
    v_h = rotate_towards(HEMATOXYLIN, (1.0, 0.2, 0.1), 6)
    v_d = rotate_towards(DAB, (0.1, 0.3, 1.0), 6)
    good = mixed_image(v_h, v_d, (240, 240, 240), glass=0.0, shape=(120, 120))
    pen = np.full((120, 120, 3), (40, 120, 40), np.uint8)  # green pen mark
    rgb = np.concatenate([good, pen], axis=1)
    mask = np.zeros(rgb.shape[:2], bool)
    mask[:, :120] = True
    model = estimate_stains(rgb, tissue_mask=mask, background=(240, 240, 240))
    assert model.source == "estimated"
    assert angle(model.vectors[1], v_d) < 3


def scarce_dab_image(v_h, v_d, background, *, n_dark=30, shape=(200, 200), seed=1):
    """Hematoxylin, pale DAB (total OD < 0.5) on 3 % of the pixels and only ``n_dark`` dark
    DAB pixels; camera noise sigma 1.5."""
    rng = np.random.default_rng(seed)
    h, w = shape
    ch = rng.gamma(2.0, 0.25, size=(h, w))
    cd = np.where(rng.random((h, w)) < 0.03, rng.uniform(0.1, 0.25, size=(h, w)), 0.0)
    flat = rng.choice(h * w, n_dark, replace=False)
    cd.flat[flat] = rng.uniform(0.5, 1.0, n_dark)
    ch[cd > 0] = 0.0  # DAB-only pixels: pale ones stay below total OD 0.5
    od = ch[..., None] * unit(v_h) + cd[..., None] * unit(v_d)
    od[:, : w // 4] = 0.0  # glass
    img = np.asarray(background, float) * 10.0 ** (-od)
    img += rng.normal(0, 1.5, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def test_estimate_stains_scarce_dab_keeps_preset_and_says_so():
    """Few confidently DAB pixels: DAB stays at the preset, hematoxylin is still estimated."""
    v_h = rotate_towards(HEMATOXYLIN, (1.0, 0.2, 0.1), 6)
    v_d = rotate_towards(DAB, (0.1, 0.3, 1.0), 8)
    bg = (238.0, 234.0, 244.0)
    rgb = scarce_dab_image(v_h, v_d, bg, n_dark=30)
    model = estimate_stains(rgb, background=bg)
    assert model.source.startswith("estimated (DAB kept at the preset: ")
    assert "with total OD >= 0.5" in model.source and "need 100)" in model.source
    assert angle(model.vectors[1], DAB) < 1e-6
    assert angle(model.vectors[0], v_h) < 2.0  # hematoxylin followed the 6 degree drift
    # with enough dark DAB pixels the DAB vector is estimated again and follows the drift
    rich = estimate_stains(scarce_dab_image(v_h, v_d, bg, n_dark=1500), background=bg)
    assert rich.source == "estimated"
    assert angle(rich.vectors[1], v_d) < 2.0
    # the threshold is a parameter: 30 confident pixels are enough when allowed
    allowed = estimate_stains(rgb, background=bg, min_confident_pixels=20)
    assert allowed.source == "estimated"
    assert angle(allowed.vectors[1], DAB) > 1.0


def test_estimate_stains_pale_counterstain_uses_darkest_pixels():
    """No hematoxylin pixel reaches confident_od: its darkest pixels are used, and recorded."""
    v_h = rotate_towards(HEMATOXYLIN, (1.0, 0.2, 0.1), 6)
    v_d = rotate_towards(DAB, (0.1, 0.3, 1.0), 6)
    rgb = mixed_image(v_h, v_d, (240, 240, 240))
    model = estimate_stains(rgb, background=(240, 240, 240), confident_od=50.0,
                            min_confident_pixels=100)
    # nothing is that dark: DAB at the preset, hematoxylin from its 100 darkest pixels
    assert "hematoxylin from its 100 darkest pixels (0 with total OD >= 50)" in model.source
    assert "DAB kept at the preset" in model.source
    assert angle(model.vectors[0], v_h) < 3.0


@pytest.mark.parametrize("marker, seed", [("MHC-I", 3), ("CD163", 3)])
def test_estimate_stains_follows_8deg_batch_drift_on_generated_sections(marker, seed):
    """Abundant DAB, both vectors rotated 8 degrees, uneven light, JPEG: within 2 degrees."""
    from biopsyquant.synthetic import generate_section

    sec = generate_section(marker=marker, seed=seed, shape=(384, 384), mpp=0.5,
                           vector_jitter_deg=8.0, illumination=0.1, jpeg_quality=85)
    true = sec.stain_model.vectors
    assert angle(true[1], DAB) == pytest.approx(8.0, abs=0.01)
    model = estimate_stains(sec.rgb)
    assert model.source == "estimated"
    assert angle(model.vectors[0], true[0]) < 2.0
    assert angle(model.vectors[1], true[1]) < 2.0


def test_estimate_stains_sparse_granular_dab_from_confident_pixels():
    """IL-1b at low expression (sparse, blurred granules): the earlier estimator, whose
    extremes included every pale pixel, was 5.6 degrees off; confident pixels: < 2.5."""
    from biopsyquant.synthetic import generate_section

    sec = generate_section(marker="IL-1b", seed=3, shape=(384, 384), mpp=0.5, expression=0.2,
                           vector_jitter_deg=8.0, illumination=0.1, jpeg_quality=85)
    true = sec.stain_model.vectors
    new = estimate_stains(sec.rgb)
    old = estimate_stains(sec.rgb, confident_od=0.0, min_confident_pixels=0)
    assert new.source == "estimated" and old.source == "estimated"
    assert angle(new.vectors[1], true[1]) < 2.5
    assert angle(old.vectors[1], true[1]) > 4.0
    assert angle(new.vectors[0], true[0]) < 2.0


# ------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    model = estimate_stains(immunohistochemistry())
    path = save_stains(model, tmp_path / "stains.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stains.json"]  # no temp left
    doc = json.loads(path.read_text())
    assert doc["source"] == "estimated" and len(doc["background"]) == 3
    back = load_stains(path)
    assert back.names == model.names and back.source == model.source
    np.testing.assert_allclose(back.vectors, model.vectors, atol=2e-6)
    np.testing.assert_allclose(back.background, model.background, atol=1e-3)
    # overwrite in place
    save_stains(PRESETS["H-E"], path)
    assert load_stains(path).source == "preset:H-E"


@pytest.mark.parametrize(
    "content",
    ["not json", "[1, 2]", '{"names": ["a", "b", "c"]}',
     '{"names": ["a","b","c"], "vectors": [[1,0,0],[1,0,0],[0,0,1]]}',
     '{"kind": "something-else", "names": [], "vectors": []}'],
)
def test_load_stains_rejects_bad_files(tmp_path, content):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(InputError, match="bad.json"):
        load_stains(p)


def test_load_stains_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_stains(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------
# real images with ground truth (skipped when ../shared/realdata is absent)
# ------------------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.slow
def test_bcdata_ki67_dab_separates_annotated_nuclei(realdata):
    """BCData Ki-67: DAB OD at positive vs negative tumour-nucleus centroids (26 tiles).

    Measured: AUC 0.997 with estimated stains; the measured background keeps negative nuclei
    below the 1+ threshold far more often than a fixed white of 255 (8 % vs 19 % above 0.2 OD).
    """
    import pandas as pd
    from scipy import ndimage as ndi
    from scipy.stats import mannwhitneyu
    from skimage.io import imread

    folder = realdata / "bcdata_ki67_breast"
    pos, neg, pos255, neg255 = [], [], [], []
    n_estimated = 0
    for i in range(26):
        rgb = imread(folder / "images" / f"{i}.png")[..., :3]
        pts = pd.read_csv(folder / "points" / f"{i}.csv")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = estimate_stains(rgb)
        n_estimated += model.source == "estimated"
        y = pts["y"].clip(0, rgb.shape[0] - 1).astype(int).to_numpy()
        x = pts["x"].clip(0, rgb.shape[1] - 1).astype(int).to_numpy()
        is_pos = (pts["label"] == "positive").to_numpy()
        for m, p_list, n_list in ((model, pos, neg), (PRESETS["H-DAB"], pos255, neg255)):
            dab = ndi.uniform_filter(stain_od(rgb, m, "dab"), 7)[y, x]
            p_list += list(dab[is_pos])
            n_list += list(dab[~is_pos])
    pos, neg = np.array(pos), np.array(neg)
    assert len(pos) == 1371 and len(neg) == 1648
    assert n_estimated >= 24
    auc = mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))
    assert auc > 0.98
    assert np.median(pos) > 1.0 and abs(np.median(neg)) < 0.1
    assert np.mean(pos >= 0.2) > 0.98
    assert np.mean(neg >= 0.2) < 0.12
    assert np.mean(np.array(neg255) >= 0.2) > np.mean(neg >= 0.2) + 0.05


def test_background_glass_peak_not_merged_with_adjacent_tissue_peak():
    """Regression: glass (~232) next to a larger pale-tissue peak (~214) whose valley stays
    above half the glass peak height; the half-maximum walk must stop at the valley."""
    from biopsyquant.synthetic import generate_section

    sec = generate_section(marker="CD163", seed=56, shape=(768, 768), mpp=0.5)
    bg = estimate_background(sec.rgb)
    glass = sec.rgb[~sec.tissue].astype(float)
    expected = np.median(glass, axis=0)
    assert np.abs(np.asarray(bg) - expected).max() <= 4.0
