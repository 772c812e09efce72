"""Tests of the compiled watershed against scikit-image's (the reference implementation)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import watershed as sk_watershed

from biopsyquant._watershed import watershed
from biopsyquant.errors import InputError

CONN = [1, 2]


def _random_markers(rng, shape, n, n_labels):
    mk = np.zeros(shape, np.int32)
    if n:
        idx = rng.integers(0, mk.size, n)
        mk.flat[idx] = rng.integers(1, n_labels + 1, n)
    return mk


def _distinct_marker_values(image, markers):
    """Give every marker pixel its own value below the rest, so no two markers tie."""
    img = image.astype(np.float64).copy()
    sel = markers != 0
    img[sel] = img.min() - 1 - np.arange(sel.sum())
    return img


# --------------------------------------------------------------------------------------------
# equality with scikit-image
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("connectivity", CONN)
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_float_images_equal_skimage(connectivity, use_mask, dtype):
    rng = np.random.default_rng(10 * connectivity + use_mask)
    for trial in range(12):
        h, w = rng.integers(2, 60, 2)
        img = rng.random((h, w)).astype(dtype)
        if dtype == np.float64:
            img += rng.random((h, w)) * 1e-9  # not representable in float32: float64 path
        n = [0, 1, 5, h * w // 10, h * w // 2][trial % 5]
        mk = _random_markers(rng, (h, w), n, 7)
        mask = rng.random((h, w)) > 0.25 if use_mask else None
        ref = sk_watershed(img, mk, mask=mask, connectivity=connectivity)
        for method in ("auto", "exact"):
            got = watershed(img, mk, mask=mask, connectivity=connectivity, method=method)
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, ref, err_msg=f"trial {trial} method {method}")


@pytest.mark.parametrize("connectivity", CONN)
@pytest.mark.parametrize("use_mask", [False, True])
def test_integer_images_with_many_ties(connectivity, use_mask):
    """Few grey levels: nearly every flood step is a tie, decided by scikit-image's age rule."""
    rng = np.random.default_rng(connectivity + 5 * use_mask)
    for trial, dtype in enumerate([np.uint8, np.int16, np.int64, np.float64, np.int32, np.uint16] * 2):
        h, w = rng.integers(1, 45, 2)
        img = rng.integers(0, 4, (h, w)).astype(dtype)
        if dtype == np.float64:
            img += 0.1  # ties that float32 cannot hold exactly: the float64 code path
        mk = _random_markers(rng, (h, w), int(rng.integers(0, h * w // 4 + 2)), 5)
        mask = rng.random((h, w)) > 0.2 if use_mask else None
        ref = sk_watershed(img, mk, mask=mask, connectivity=connectivity)
        # exact mode: identical whatever ties the markers have (port of skimage's heap if needed)
        got = watershed(img, mk, mask=mask, connectivity=connectivity, method="exact")
        np.testing.assert_array_equal(got, ref, err_msg=f"exact, trial {trial}")
        # fast mode: identical as soon as no two differently labelled markers share a value;
        # the plateaus (all non-marker pixels) keep their ties
        img2 = _distinct_marker_values(img, mk)
        ref2 = sk_watershed(img2, mk, mask=mask, connectivity=connectivity)
        got2 = watershed(img2, mk, mask=mask, connectivity=connectivity)
        np.testing.assert_array_equal(got2, ref2, err_msg=f"fast, trial {trial}")
        # with cross-label marker ties the fast mode may split tie pixels differently, never
        # labels a different set of pixels and never invents or loses labels
        fast = watershed(img, mk, mask=mask, connectivity=connectivity)
        np.testing.assert_array_equal(fast != 0, ref != 0)
        assert set(np.unique(fast)) == set(np.unique(ref))


def test_same_label_marker_ties_are_exact_in_fast_mode():
    """Plateau markers (many pixels of one label at one value) need no heap order."""
    rng = np.random.default_rng(3)
    for _ in range(10):
        img = rng.integers(0, 5, (40, 50)).astype(np.float32)
        mk = np.zeros(img.shape, np.int32)
        for lab in range(1, 6):
            r, c = rng.integers(2, 38), rng.integers(2, 48)
            mk[r - 1:r + 2, c - 1:c + 2] = lab
            img[r - 1:r + 2, c - 1:c + 2] = -lab  # one value per label, shared by its pixels
        for conn in CONN:
            np.testing.assert_array_equal(watershed(img, mk, connectivity=conn),
                                          sk_watershed(img, mk, connectivity=conn))


def test_realistic_distance_transform_split():
    """fibers.py step 2: -smoothed distance transform of touching blobs, peak markers."""
    rng = np.random.default_rng(7)
    size = 256
    pts = np.zeros((size, size), bool)
    pts[rng.integers(0, size, 60), rng.integers(0, size, 60)] = True
    _, (iy, ix) = ndi.distance_transform_edt(~pts, return_indices=True)
    vor = iy * size + ix
    core = ~ndi.binary_dilation(ndi.maximum_filter(vor, 3) != ndi.minimum_filter(vor, 3))
    dist = ndi.distance_transform_edt(core).astype(np.float32)
    dsm = ndi.gaussian_filter(dist, 1.0)
    peaks = core & (dsm >= ndi.maximum_filter(dsm, 3)) & (dsm > 0.5)
    markers, n = ndi.label(peaks, np.ones((3, 3)))
    assert n > 40
    ref = sk_watershed(-dsm, markers, mask=core)
    np.testing.assert_array_equal(watershed(-dsm, markers, mask=core, method="exact"), ref)
    fast = watershed(-dsm, markers, mask=core)
    assert set(np.unique(fast)) == set(np.unique(ref))
    assert (fast == ref).mean() >= 0.999
    # step 3: edge strength grown from the split cores inside a band around them
    edge = np.hypot(ndi.sobel(dsm, 0), ndi.sobel(dsm, 1)).astype(np.float32)
    region = ndi.binary_dilation(ref > 0, iterations=3)
    seeds = np.where(ndi.binary_erosion(ref > 0, iterations=2), ref, 0).astype(np.int32)
    ref3 = sk_watershed(edge, seeds, mask=region, connectivity=2)
    np.testing.assert_array_equal(watershed(edge, seeds, mask=region, connectivity=2, method="exact"), ref3)
    fast3 = watershed(edge, seeds, mask=region, connectivity=2)
    assert (fast3 == ref3).mean() >= 0.999
    assert set(np.unique(fast3)) == set(np.unique(ref3))


# --------------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (2, 2), (1, 40)])
def test_tiny_images(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        img = rng.random(shape).astype(np.float32)
        mk = _random_markers(rng, shape, int(rng.integers(0, 3)), 3)
        for conn in CONN:
            np.testing.assert_array_equal(watershed(img, mk, connectivity=conn),
                                          sk_watershed(img, mk, connectivity=conn))


def test_empty_and_full_markers_and_masks():
    rng = np.random.default_rng(1)
    img = rng.random((20, 30)).astype(np.float32)
    none = np.zeros(img.shape, np.int32)
    assert not watershed(img, none).any()
    np.testing.assert_array_equal(watershed(img, none), sk_watershed(img, none))
    full = np.arange(1, img.size + 1, dtype=np.int32).reshape(img.shape)
    np.testing.assert_array_equal(watershed(img, full), full)
    mask = np.zeros(img.shape, bool)
    assert not watershed(img, full, mask=mask).any()
    # one marker floods its whole connected part of the mask, nothing else
    mask[:, :10] = True
    mask[:, 20:] = True
    one = none.copy()
    one[5, 5] = 4
    got = watershed(img, one, mask=mask)
    assert set(np.unique(got[:, :10])) == {4} and not got[:, 10:].any()


def test_markers_outside_mask_are_dropped():
    rng = np.random.default_rng(2)
    img = rng.random((25, 25)).astype(np.float32)
    mask = rng.random(img.shape) > 0.3
    mk = _random_markers(rng, img.shape, 30, 4)
    mk[~mask & (rng.random(img.shape) > 0.5)] = 9  # label 9 only outside the mask
    ref = sk_watershed(img, mk, mask=mask)
    got = watershed(img, mk, mask=mask)
    np.testing.assert_array_equal(got, ref)
    assert 9 not in got
    assert not got[~mask].any()


def test_other_marker_types_and_values():
    rng = np.random.default_rng(4)
    img = rng.random((30, 30))
    mk = _random_markers(rng, img.shape, 12, 3)
    np.testing.assert_array_equal(watershed(img, mk > 0), sk_watershed(img, mk > 0).astype(np.int32))
    neg = -mk.astype(np.int64)  # negative labels flood like positive ones in skimage
    np.testing.assert_array_equal(watershed(img, neg), sk_watershed(img, neg))
    big = mk.astype(np.int64) * 100_000_000
    np.testing.assert_array_equal(watershed(img, big), sk_watershed(img, big))


def test_signed_zero_and_huge_ranges():
    img = np.array([[0.0, -0.0, 0.0, -0.0, 0.0, 3.0, -0.0, 0.0]], np.float32)
    mk = np.array([[1, 0, 0, 0, 0, 0, 0, 2]], np.int32)
    np.testing.assert_array_equal(watershed(img, mk), sk_watershed(img, mk))
    rng = np.random.default_rng(5)
    wide = (rng.random((20, 20)) - 0.5) * 3e38  # range overflows float32 when subtracted
    wide[0, 0] = np.finfo(np.float64).max / 2
    mk = _random_markers(rng, wide.shape, 8, 4)
    np.testing.assert_array_equal(watershed(wide, mk), sk_watershed(wide, mk))
    ints = rng.integers(-2**40, 2**40, (20, 20))  # int64 beyond float32: float64 path
    np.testing.assert_array_equal(watershed(ints, mk), sk_watershed(ints, mk))


def test_non_finite_outside_mask_is_ignored():
    rng = np.random.default_rng(6)
    img = rng.random((15, 15)).astype(np.float32)
    mask = np.ones(img.shape, bool)
    mask[:, 0] = False
    img[:, 0] = np.nan
    mk = _random_markers(rng, img.shape, 6, 3)
    got = watershed(img, mk, mask=mask)
    np.testing.assert_array_equal(got, sk_watershed(np.nan_to_num(img), mk, mask=mask))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros((3, 4, 2))}, "2-D"),
        ({"markers": np.zeros((3, 5), np.int32)}, "shape"),
        ({"mask": np.ones((4, 4), bool)}, "shape"),
        ({"mask": np.ones((3, 4, 1), bool)}, "2-D"),
        ({"image": np.full((3, 4), np.nan)}, "NaN"),
        ({"image": np.full((3, 4), np.inf, np.float32)}, "NaN or infinite"),
        ({"image": np.zeros((3, 4), complex)}, "numeric"),
        ({"image": np.zeros((3, 4), object)}, "numeric"),
        ({"markers": np.zeros((3, 4), np.float32)}, "integer"),
        ({"markers": np.full((3, 4), 2**40)}, "int32"),
        ({"markers": np.full((3, 4), np.iinfo(np.int32).min, np.int32)}, "reserved"),
        ({"connectivity": 3}, "connectivity"),
        ({"connectivity": True}, "connectivity"),
        ({"method": "fastest"}, "method"),
        ({"mask": np.zeros((3, 4), "U1")}, "boolean"),
    ],
)
def test_bad_input_raises_input_error(kwargs, match):
    args = {"image": np.zeros((3, 4), np.float32), "markers": np.eye(3, 4, dtype=np.int32)}
    args.update(kwargs)
    image = args.pop("image")
    markers = args.pop("markers")
    with pytest.raises(InputError, match=match):
        watershed(image, markers, **args)


def test_empty_image():
    out = watershed(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.int32))
    assert out.shape == (0, 5) and out.dtype == np.int32
