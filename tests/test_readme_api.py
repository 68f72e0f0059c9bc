"""The README's "From Python" example runs as written (in a scratch folder, with the repo's configs)."""

from __future__ import annotations

import re
import shutil

from conftest import ROOT


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    # the demo's 192 px model, made quick for a test: smaller images, one short epoch
    code = code.replace('"train.epochs=1"', '"train.epochs=1", "model.img_size=64", "train.progress=false"')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    exec(compile(code, "README.md", "exec"), {})  # a user runs it again: it must not stop on its own files
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].endswith(" bool")  # print(mask.shape, mask.dtype)
    assert (tmp_path / "runs" / "api" / "eval.json").is_file()
