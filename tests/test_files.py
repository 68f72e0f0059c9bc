"""Atomic writes: never through a link, temporary names only samft uses, legal for every legal file name."""

from __future__ import annotations

import os

import pytest

from samft.files import NAME_MAX, atomic_write_bytes, is_own_tmp, tmp_name


def test_a_long_legal_name_is_written(tmp_path):
    name = "x" * (NAME_MAX - 4) + ".png"  # 255 bytes: legal, but .NAME.PID.tmp would not be
    atomic_write_bytes(tmp_path / name, b"data")
    assert (tmp_path / name).read_bytes() == b"data"
    assert len(tmp_name(name).encode()) <= NAME_MAX and is_own_tmp(tmp_name(name))
    assert sorted(os.listdir(tmp_path)) == [name]


def test_multibyte_long_names_stay_within_the_limit():
    name = "é" * 126 + ".png"  # 256 bytes of UTF-8 would be illegal; 252 + 4 = 256 -> use 125
    name = "é" * 125 + ".png"
    assert len(name.encode()) <= NAME_MAX
    assert len(tmp_name(name).encode()) <= NAME_MAX


def test_a_planted_link_at_the_temporary_name_is_not_written_through(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("user's file")
    (tmp_path / "run").mkdir()
    os.symlink(target, tmp_path / "run" / tmp_name("eval.json"))
    atomic_write_bytes(tmp_path / "run" / "eval.json", b"{}")
    assert target.read_text() == "user's file"
    assert (tmp_path / "run" / "eval.json").read_bytes() == b"{}"


def test_a_link_at_the_path_is_replaced_not_followed(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("user's file")
    os.symlink(target, tmp_path / "metrics.csv")
    atomic_write_bytes(tmp_path / "metrics.csv", b"a,b\n")
    assert target.read_text() == "user's file"
    assert not (tmp_path / "metrics.csv").is_symlink()


@pytest.mark.parametrize("name,own", [(".eval.json.samft-12.tmp", True), (".x.samft-1.tmp", True),
                                      ("notes.tmp", False), (".notes.tmp", False), (".eval.json.12.tmp", False),
                                      (".a.samft-x.tmp", False)])
def test_only_samfts_own_temporary_names_are_recognised(name, own):
    assert is_own_tmp(name) is own
