"""Settings: presets, user files, overrides, validation and round trips."""

from __future__ import annotations

import pytest

from biopsyquant.errors import SettingsError
from biopsyquant.settings import Settings, canonical_marker, load_settings, parse_overrides


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [("cd163", "CD163"), ("IL1B", "IL-1b"), ("il-1α", "IL-1a"), ("IL-1RA", "IL-1Ra"),
     ("hla-abc", "MHC-I"), ("MHC1", "MHC-I"), ("ki-67", "Ki67")],
)
def test_marker_spellings(spelling, canonical):
    assert canonical_marker(spelling) == canonical


def test_unknown_marker_lists_choices():
    with pytest.raises(SettingsError, match="unknown marker 'CD68'.*CD163"):
        load_settings("CD68")


def test_analysis_kind_per_marker():
    assert load_settings("CD163").analysis == "cells"
    assert load_settings("MHC-I").analysis == "mhc"
    for m in ("IL-1a", "IL-1b", "IL-1Ra"):
        assert load_settings(m).analysis == "pixels"
    assert load_settings("Ki67").scoring.segment_fibers is False


def test_overrides_are_typed_and_recorded():
    s = load_settings("CD163", overrides=["stains.estimate=false", "tiling.overlap_um=175",
                                          "stains.preset='H-E-DAB'"])
    assert s.stains.estimate is False
    assert s.tiling.overlap_um == 175.0 and isinstance(s.tiling.overlap_um, float)
    assert s.stains.preset == "H-E-DAB"
    assert s.get("tiling.overlap_um") == 175.0
    assert s.origin[-1] == "overrides"
    assert s.digest() != load_settings("CD163").digest()


def test_int_setting_accepts_integral_float_only():
    s = load_settings("CD163", overrides={"tiling.tile_size_px": 1024.0})
    assert s.tiling.tile_size_px == 1024 and isinstance(s.tiling.tile_size_px, int)
    with pytest.raises(SettingsError, match="tiling.tile_size_px.*integer"):
        load_settings("CD163", overrides={"tiling.tile_size_px": 10.5})


@pytest.mark.parametrize(
    ("override", "message"),
    [("tiling.nonsense=1", "unknown setting 'tiling.nonsense'.*overlap_um"),
     ("bogus.key=1", "unknown settings section 'bogus'"),
     ("stains.estimate=maybe", "expected true/false"),
     ("tiling.overlap_um='wide'", "expected a number"),
     ("no_dot_here", "section.key=value")],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(SettingsError, match=message):
        load_settings("IL-1b", overrides=[override])


def test_user_file_and_bad_files(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text("[tiling]\ntile_size_px = 512\n")
    s = load_settings("CD163", f)
    assert s.tiling.tile_size_px == 512
    assert str(f) in s.origin
    bad = tmp_path / "bad.toml"
    bad.write_text("[tiling\n")
    with pytest.raises(SettingsError, match="bad.toml: not valid TOML"):
        load_settings("CD163", bad)
    with pytest.raises(SettingsError, match="missing.toml: settings file not found"):
        load_settings("CD163", tmp_path / "missing.toml")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[tilling]\ntile_size_px = 512\n")
    with pytest.raises(SettingsError, match=r"unknown settings section \[tilling\]"):
        load_settings("CD163", unknown)


def test_toml_and_dict_round_trip(tmp_path):
    s = load_settings("MHC-I", overrides=["tiling.overlap_um=123.5", "stains.estimate=false"])
    f = tmp_path / "s.toml"
    f.write_text(s.to_toml())
    back = load_settings("MHC-I", f)
    assert back.to_dict() == s.to_dict()
    assert back.digest() == s.digest()
    assert Settings.from_dict(s.to_dict()).digest() == s.digest()


def test_parse_overrides_values():
    d = parse_overrides(["a.b=1", "a.c=0.5", "a.d=true", "a.e=[1, 2]", "a.f=hello"])
    assert d == {"a.b": 1, "a.c": 0.5, "a.d": True, "a.e": [1, 2], "a.f": "hello"}
