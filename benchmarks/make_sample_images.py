"""Regenerate ``sample_images/`` (synthetic sections with truth) deterministically.

Usage: ``python benchmarks/make_sample_images.py [folder]`` (default: the repository's
``sample_images/``).  Prints each file and its size.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from biopsyquant.synthetic import write_sample_images


def main(argv: list[str]) -> int:
    folder = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "sample_images"
    t0 = time.perf_counter()
    files = write_sample_images(folder)
    total = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    for f in files:
        print(f"{f.name:32s} {f.stat().st_size / 1024:7.1f} kB")
    print(f"{len(files)} images, folder total {total / 1e6:.2f} MB, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
