"""Glob expansion that terminates on symlink loops and otherwise matches ``glob.glob(recursive=True)``."""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samft.data.paths import expand_glob


def _tree(root: Path) -> None:
    for rel in ["a.png", "b.jpg", ".hidden.png", "sub/c.png", "sub/deeper/d.png", "sub/.h/e.png", "other/f.PNG",
                "other/g.txt", ".dot/h.png"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


@pytest.mark.parametrize("pattern", ["*.png", "**/*.png", "**", "sub/**/*.png", "*/*.png", "sub/*/*.png", "**/d.*",
                                     "**/.h/*.png", "[ab].*", "?.png", "other/*", "nothing/**/*.png"])
def test_the_same_files_as_glob_without_loops(tmp_path, pattern):
    _tree(tmp_path)
    expected = sorted(Path(p) for p in glob.glob(str(tmp_path / pattern), recursive=True) if Path(p).is_file())
    files, loops = expand_glob(str(tmp_path / pattern))
    assert files == expected and loops == []


@pytest.mark.timeout(60)
def test_a_link_back_up_is_not_followed_and_is_reported(tmp_path):
    _tree(tmp_path)
    os.symlink("..", tmp_path / "sub" / "up")  # sub/up -> the root: glob.glob would walk for ever
    os.symlink(tmp_path / "other", tmp_path / "sub" / "elsewhere")  # a link to a sibling folder is followed
    files, loops = expand_glob(str(tmp_path / "**" / "*.png"))
    assert loops == [tmp_path / "sub" / "up"]
    names = [str(f.relative_to(tmp_path)) for f in files]
    assert names == ["a.png", "sub/c.png", "sub/deeper/d.png"]  # *.png is case-sensitive, as glob's
    files, _ = expand_glob(str(tmp_path / "**" / "*.PNG"))
    assert [str(f.relative_to(tmp_path)) for f in files] == ["other/f.PNG", "sub/elsewhere/f.PNG"]


@pytest.mark.timeout(60)
def test_predict_on_a_folder_with_a_link_loop_ends_and_says_so(tmp_path):
    """The hang of the trust review: ``samft predict 'IN/**/*.png'`` with ``sub/up -> ..``."""
    from samft.engine.infer.predict import collect_inputs

    (tmp_path / "IN" / "sub").mkdir(parents=True)
    for rel in ["IN/x.png", "IN/sub/y.png"]:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / rel)
    os.symlink("..", tmp_path / "IN" / "sub" / "up")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = collect_inputs([str(tmp_path / "IN" / "**" / "*.png")])
    assert [str(f.relative_to(tmp_path)) for f in files] == ["IN/sub/y.png", "IN/x.png"]
    assert any("leads back to itself" in str(w.message) and "up" in str(w.message) for w in caught)


def test_linked_inputs_are_named_after_the_links(tmp_path):
    """The attack round: masks of linked inputs were named after the link's target (hash-named blobs of DVC or
    git-annex), and two links to one file gave one mask."""
    from samft.data.layouts import distinct_names
    from samft.engine.infer.predict import collect_inputs

    blob = tmp_path / "store" / "0007.png"
    blob.parent.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(blob)
    (tmp_path / "in").mkdir()
    os.symlink(blob, tmp_path / "in" / "cat.png")
    os.symlink(blob, tmp_path / "in" / "dog.png")
    files = collect_inputs([str(tmp_path / "in")])
    assert [f.name for f in files] == ["cat.png", "dog.png"]
    assert distinct_names(files) == ["cat", "dog"]


def test_non_regular_inputs_are_named_for_what_they_are(tmp_path):
    """A FIFO given as an image is 'not a regular file' (it said 'no such file'); a FIFO named like an image in a
    folder is skipped with one warning, not in silence."""
    from samft.engine.infer.predict import collect_inputs
    from samft.errors import SamftError

    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    os.mkfifo(tmp_path / "in" / "b.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "in" / "c.png")
    with pytest.raises(SamftError, match=r"b\.png: not a regular file"):
        collect_inputs([str(tmp_path / "in" / "b.png")])
    with pytest.raises(SamftError, match=r"c\.png: a link to nothing"):
        collect_inputs([str(tmp_path / "in" / "c.png")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = collect_inputs([str(tmp_path / "in")])
    assert [f.name for f in files] == ["a.png"]
    assert any("2 entr(y/ies) named like images skipped" in str(w.message) for w in caught)
