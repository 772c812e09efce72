"""Mutation fuzzing of the slide reader.

Damaged TIFF (and PNG/JPEG) bytes must give either a valid uint8 (h, w, 3) read or a
:class:`~biopsyquant.errors.SlideError` - never another exception, an interpreter crash or a
hang.  The hypothesis test runs in-process (deterministic: ``derandomize=True``); a second test
runs a batch of seeded mutations in a child interpreter with a timeout, so a segfault or an
endless loop in a decoder fails the test instead of killing or stalling the suite.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import warnings
from functools import cache
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biopsyquant.errors import SlideError
from biopsyquant.slide import PixelSizeWarning, open_slide

ROOT = Path(__file__).resolve().parents[1]


def _image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 3) % 256, (yy * 5) % 256, ((xx + yy) * 2) % 256], axis=-1)
    return img.astype(np.uint8)


@cache
def _bases() -> dict[str, bytes]:
    """Small valid files: tiled pyramids with several codecs, OME, BigTIFF, strips, PNG, JPEG."""
    img = _image(96, 80)
    out: dict[str, bytes] = {}
    for comp in ("jpeg", "zlib", "lzw"):
        b = io.BytesIO()
        with tifffile.TiffWriter(b) as tw:
            tw.write(img, tile=(32, 32), compression=comp, subifds=1, photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
            tw.write(img[::2, ::2], tile=(32, 32), compression=comp, subfiletype=1,
                     photometric="rgb")
        out[f"pyramid-{comp}"] = b.getvalue()
    b = io.BytesIO()
    with tifffile.TiffWriter(b, bigtiff=True, ome=True) as tw:
        tw.write(img, tile=(32, 32), compression="zlib", photometric="rgb",
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    out["ome-bigtiff"] = b.getvalue()
    b = io.BytesIO()
    tifffile.imwrite(b, img[..., 0].astype(np.uint16) * 200, rowsperstrip=16, compression="lzw")
    out["strips-uint16"] = b.getvalue()
    out["png"] = imagecodecs.png_encode(img)
    out["jpeg"] = imagecodecs.jpeg8_encode(img, level=90)
    return out


def _mutate(data: bytes, kind: str, params: list[int]) -> bytes:
    buf = bytearray(data)
    n = len(buf)
    if kind == "flip":  # random single-byte overwrites anywhere
        for i in range(0, len(params) - 1, 2):
            buf[params[i] % n] = params[i + 1] % 256
    elif kind == "truncate":
        buf = buf[: max(1, params[0] % n)]
    elif kind == "header":  # overwrite 4 bytes in the first 512 (IFD entries, counts, offsets)
        pos = params[0] % min(n, 512)
        buf[pos : pos + 4] = bytes(p % 256 for p in params[1:5])
    return bytes(buf)


def _exercise(path: Path) -> str:
    """Open and read everything cheap; return 'ok' or 'slide-error'."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PixelSizeWarning)
            s = open_slide(path, max_pixels=50_000_000)
        with s:
            for lv in s.levels:
                a = s.read_region(3, 5, 40, 30, level=lv.index)
                assert a.shape == (30, 40, 3) and a.dtype == np.uint8
            t, ds = s.thumbnail(max_size=32)
            assert t.dtype == np.uint8 and t.ndim == 3 and t.shape[2] == 3
            assert max(t.shape[:2]) <= 32 and ds > 0
            s.info_dict()
        return "ok"
    except SlideError as exc:
        assert str(path) in str(exc)
        return "slide-error"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=120, deadline=5000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    base=st.sampled_from(sorted(_bases())),
    kind=st.sampled_from(["flip", "truncate", "header"]),
    params=st.lists(st.integers(0, 2**31), min_size=6, max_size=20),
)
def test_damaged_bytes_read_or_slide_error(fuzz_dir, base, kind, params):
    data = _mutate(_bases()[base], kind, params)
    path = fuzz_dir / f"fuzz-{base}.bin"
    path.write_bytes(data)
    _exercise(path)  # anything but ok / SlideError fails the test


def test_undamaged_bases_read(fuzz_dir):
    """Control: every base file reads correctly (so the fuzz above starts from valid files)."""
    for name, data in _bases().items():
        p = fuzz_dir / f"base-{name}.bin"
        p.write_bytes(data)
        assert _exercise(p) == "ok", name


_CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import numpy as np
    import test_slide_fuzz as F
    warnings.simplefilter("ignore")
    out = Path({out!r})
    counts = {{"ok": 0, "slide-error": 0}}
    bases = F._bases()
    names = sorted(bases)
    for i in range({n}):
        rng = np.random.default_rng(1000 + i)
        name = names[i % len(names)]
        kind = ["flip", "truncate", "header"][int(rng.integers(3))]
        params = [int(v) for v in rng.integers(0, 2**31, 12)]
        p = out / ("child-" + name + ".bin")
        p.write_bytes(F._mutate(bases[name], kind, params))
        print(i, name, kind, flush=True, file=sys.stderr)
        counts[F._exercise(p)] += 1
    print(json.dumps(counts))
    """
)


def test_damaged_bytes_never_crash_or_hang_the_interpreter(tmp_path):
    n = 150
    code = _CHILD.format(tests=str(ROOT / "tests"), out=str(tmp_path), n=n)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=240, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - a hang is the failure
        last = (exc.stderr or b"")[-300:]
        pytest.fail(f"reader hung on a damaged file; last cases: {last!r}")
    last_case = proc.stderr.strip().splitlines()[-1:] if proc.stderr else []
    assert proc.returncode == 0, (
        f"child exited with {proc.returncode} (crash or unexpected exception) at {last_case}: "
        f"{proc.stderr[-2000:]}"
    )
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["ok"] + counts["slide-error"] == n
    # the mutations must actually break files, and not every file
    assert counts["slide-error"] > 10 and counts["ok"] > 10
