"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _realdata_dir() -> Path:
    env = os.environ.get("BIOPSYQUANT_REALDATA")
    if env:
        return Path(env)
    return ROOT.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """Path of ../shared/realdata; tests using it skip cleanly when it is absent."""
    d = _realdata_dir()
    if not d.is_dir():
        pytest.skip(f"real validation data not found at {d} (set BIOPSYQUANT_REALDATA)")
    return d


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
