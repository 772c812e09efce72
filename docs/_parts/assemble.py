"""Assemble docs/validation.md and docs/performance.md from the per-topic parts.

Run: python docs/_parts/assemble.py  (the parts stay the single source; edit them, not the output)
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent
ORDER = ["e2e", "slide", "stains", "illumination", "synthetic", "fibers", "cells", "mhc", "pixels", "batch",
         "compare"]

HEADERS = {
    "validation": (
        "# Validation: accuracy of biopsyquant\n\n"
        "Accuracy measured against known truth: synthetic sections rendered with exact ground truth\n"
        "(`biopsyquant.synthetic`) and real third-party annotated images (`../shared/realdata/`,\n"
        "used for validation only, never shipped). OD is log10 relative to the measured background.\n"
        "One parameter set per marker preset; nothing is tuned per image. Each section below names\n"
        "the script or test that reproduces its numbers.\n"
    ),
    "performance": (
        "# Performance: throughput and memory\n\n"
        "Measured on the project's 2-core / 24 GB machine class by the scripts in `benchmarks/`.\n"
        "Most numbers were taken while several other processes loaded the machine (load average\n"
        "8–16 on 2 cores), so they are pessimistic; ratios measured within one run are the\n"
        "reliable part. Re-run with `make bench`.\n"
    ),
}


def _key(p: Path) -> tuple[int, str]:
    topic = p.name.split("-")[0]
    return (ORDER.index(topic) if topic in ORDER else len(ORDER), p.name)


def assemble(kind: str) -> str:
    parts = sorted(HERE.glob(f"*-{kind}.md"), key=_key)
    out = [HEADERS[kind], "\n## Contents\n"]
    out += [f"- `{p.name}`" for p in parts]
    for p in parts:
        text = p.read_text(encoding="utf-8").strip()
        # demote headings by one level so each part nests under the document title
        lines = [("#" + ln) if ln.startswith("#") else ln for ln in text.splitlines()]
        out.append(f"\n<!-- from docs/_parts/{p.name} -->\n")
        out.append("\n".join(lines))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    for kind in HEADERS:
        (DOCS / f"{kind}.md").write_text(assemble(kind), encoding="utf-8")
        print(f"wrote docs/{kind}.md")
