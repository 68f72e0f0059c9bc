"""``samft report``: the page's numbers are eval.json's, its images are embedded, everything from a run is
escaped, several runs sit side by side, a missing or damaged file is said where it matters, and the page is
written only where samft may write."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from samft.cli import app
from samft.errors import SamftError
from samft.report import build_report, write_report

from conftest import classes_dir, tiny_config

EVIL = '<script>alert("x")</script>'


def train_and_eval(out: Path, **sections) -> Path:
    from samft.engine.infer.evaluate import evaluate_run
    from samft.engine.train.loop import train

    cfg = tiny_config(sections.pop("method", "conv_lora"), **sections)
    cfg.output.dir = str(out)
    train(cfg, show_progress=False)
    evaluate_run(out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory) -> Path:
    from samft.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("report_bin")
    data = write_dataset(root / "data", n=16, seed=3)
    return train_and_eval(root / "run", data={"root": str(data), "train": ".", "val_fraction": 0.25},
                          train={"epochs": 2, "log_every": 1})


@pytest.fixture(scope="module")
def multiclass_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report_mc")
    data = classes_dir(root / "data")
    return train_and_eval(root / "run", method="lora", model={"num_mask_tokens": 3},
                          data={"root": str(data), "train": ".", "classes": ["bg", EVIL, "a $x^$ b"],
                                "val_fraction": 0.25})


@pytest.fixture(scope="module")
def binary_page(binary_run) -> str:
    return build_report([binary_run], k=2, show_progress=False)


class Page(HTMLParser):
    """The page's metric cells, images, scripts and text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.cells, self.images, self.scripts, self.text, self._cell = [], [], 0, [], None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-metric" in a:
            self._cell = {**a, "text": ""}
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"] += data


def test_the_numbers_shown_are_eval_json(binary_run, binary_page):
    """Mutants: the table showing the page's own recomputed metrics with 3 digits (text check); a metric of
    eval.json dropped from the table; the prediction pass scoring at another threshold (the page says they differ)."""
    entry = json.loads((binary_run / "eval.json").read_text())["sets"]["val"]
    page = Page(binary_page)
    shown = {c["data-metric"]: c for c in page.cells if c["data-run"] == binary_run.name}
    assert set(shown) == set(entry["metrics"])
    for metric, value in entry["metrics"].items():
        assert float(shown[metric]["data-value"]) == value
        assert shown[metric]["text"] == f"{value:.4f}"
    assert "now score" not in binary_page  # the report's own pass over the set reproduces eval.json exactly


def test_every_image_is_embedded_and_nothing_is_fetched(binary_page):
    """Figures are PNG, the examples JPEG thumbnails (each data URI's type is its bytes'). Mutants: an example
    drawn as a file path; an external stylesheet link; the examples as PNG (~6x the bytes)."""
    from PIL import Image

    from samft.report.analysis import THUMB

    page = Page(binary_page)
    assert len(page.images) >= 1 + 2 + 3 * 4  # curves, PR + distribution, 2 worst + 2 best x (image, truth, pred)
    kinds = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
    examples = re.findall(r'<img src="([^"]+)" alt="(?:image|truth|prediction) ', binary_page)
    assert len(examples) == 3 * 4
    for src in page.images:
        kind = re.match(r"data:image/(png|jpeg);base64,", src).group(1)
        data = base64.b64decode(src.split(",", 1)[1])
        assert data.startswith(kinds[kind]) and kind == ("jpeg" if src in examples else "png")
        if kind == "jpeg":
            import io

            assert max(Image.open(io.BytesIO(data)).size) <= THUMB
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", binary_page)
    assert "default-src 'none'" in binary_page  # the page may load nothing from anywhere


def test_class_names_paths_and_labels_from_a_run_are_text(multiclass_run, tmp_path):
    """Mutants: autoescape off (the class name becomes a script tag); mathtext on (the '$x^$' class name breaks
    the IoU figure)."""
    odd = tmp_path / 'run <b>&"'
    shutil.copytree(multiclass_run, odd)
    html = build_report([odd], k=1, show_progress=False)
    page = Page(html)
    assert page.scripts == 1  # the page's own marker script, nothing from the run
    assert EVIL not in html and "<b>&" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert EVIL in "".join(page.text) and 'run <b>&"' in "".join(page.text)  # shown as text


def test_multiclass_confusion_and_per_class_iou_equal_eval_json(multiclass_run):
    entry = json.loads((multiclass_run / "eval.json").read_text())["sets"]["val"]
    html = build_report([multiclass_run], k=1, show_progress=False)
    assert "confusion matrix (predictions)" in html and "IoU per class (eval.json)" in html
    cells = re.findall(r'<td>([^<]*)</td><td class="num" data-value="([^"]*)">', html)
    import html as html_lib

    shown = {html_lib.unescape(name): (float(v) if v else None) for name, v in cells}
    assert shown == entry["per_class_iou"]
    assert "now score" not in html


def test_several_runs_side_by_side(binary_run, tmp_path):
    """Two runs: one curves figure with both, one metric row each, the config keys that differ listed."""
    other = tmp_path / "other"
    shutil.copytree(binary_run, other)
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.0001", "lr: 0.0002"))
    html = build_report([binary_run, other], k=1, predict=False, show_progress=False)
    page = Page(html)
    assert {c["data-run"] for c in page.cells} == {binary_run.name, "other"}
    assert html.count('alt="training and validation curves"') == 1
    assert re.search(r"<th>train\.lr</th><td>0\.0001</td><td>0\.0002</td>", html)
    entry = json.loads((binary_run / "eval.json").read_text())["sets"]["val"]
    assert len(page.cells) == 2 * len(entry["metrics"])
    for c in page.cells:
        assert float(c["data-value"]) == entry["metrics"][c["data-metric"]]


def test_missing_and_damaged_files(binary_run, tmp_path):
    """config.yaml is the run (one line naming it); metrics.csv and eval.json each cost their own section."""
    run = tmp_path / "run"
    shutil.copytree(binary_run, run)
    (run / "metrics.csv").unlink()
    (run / "eval.json").write_text('{"sets": {"val": {"n_images": "six"}}}')
    html = build_report([run], show_progress=False, predict=False)
    assert "not available: " in html and "metrics.csv: metrics file not found" in html
    assert "eval.json: field &#39;sets.val.n_images&#39; is a string, expected an integer" in html
    (run / "config.yaml").unlink()
    with pytest.raises(SamftError, match=r"config\.yaml not found"):
        build_report([run], show_progress=False)


def test_without_predicting_the_stored_ranking_is_shown(binary_run):
    html = build_report([binary_run], k=2, predict=False, show_progress=False)
    entry = json.loads((binary_run / "eval.json").read_text())["sets"]["val"]
    key, worst = entry["sorted_by"], entry["worst"][0]
    assert "predictions not available: the report ran without predicting" in html
    assert f"{worst['image']}: {key} {worst[key]:.4f}" in html
    assert "precision-recall" not in html and "data:image/png;base64," in html  # curves and distribution still


def test_written_only_where_samft_may_write(binary_run, tmp_path):
    """A foreign file is refused without --overwrite, a page samft wrote is replaced, a run's own file never."""
    out = tmp_path / "page.html"
    out.write_text("my notes")
    with pytest.raises(SamftError, match="not a report samft wrote"):
        write_report([binary_run], out, predict=False, show_progress=False)
    assert out.read_text() == "my notes"
    write_report([binary_run], out, predict=False, show_progress=False, overwrite=True)
    first = out.read_text()
    assert first.startswith("<!DOCTYPE html>")
    write_report([binary_run], out, predict=False, show_progress=False)  # its own page: replaced
    with pytest.raises(SamftError, match="one of a run's own files"):
        write_report([binary_run], binary_run / "metrics.csv", predict=False, overwrite=True, show_progress=False)


def test_cli_writes_the_page_and_says_where(binary_run, tmp_path):
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(binary_run), "--out", str(out), "--no-predict", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"written: {out}" in result.output and out.is_file()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nothing"), "--out", str(out)])
    assert result.exit_code == 2 and "config.yaml not found" in result.output



CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]


def test_the_page_renders_in_a_real_browser(binary_run, tmp_path):
    """Headless Chromium opens the page from disk: no console message (a script error, a blocked load: the
    page's CSP reports any fetch), every image decoded (the page's own marker), the numbers of eval.json in the
    rendered DOM. Mutants: an <img> pointing at a URL (blocked: a console line, 1 image short); a script error."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package (apt-get install -y chromium)")
    import subprocess

    page = write_report([binary_run], tmp_path / "page.html", k=2, show_progress=False)
    done = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    dom = done.stdout
    loaded = re.search(r'<html[^>]* data-images="(\d+)/(\d+)"', dom)
    assert loaded and loaded.group(1) == loaded.group(2) and int(loaded.group(2)) >= 1 + 2 + 3 * 4, dom[:300]
    assert "data-errors" not in dom
    entry = json.loads((binary_run / "eval.json").read_text())["sets"]["val"]
    cells = {c["data-metric"]: c for c in Page(dom).cells}
    assert {m: c["text"] for m, c in cells.items()} == {m: f"{v:.4f}" for m, v in entry["metrics"].items()}


@pytest.mark.parametrize("which", ["binary_run", "multiclass_run"])
def test_a_set_evaluated_by_tiles_is_predicted_by_the_same_tiles(which, request, tmp_path):
    """eval --tile 48 (the images are larger than a tile: tiles score otherwise than whole images): the report
    predicts the set with the tiles its eval.json entry records, so its metrics are eval.json's and the page
    says nothing differs. Mutant: the report predicting whole images (the 'now score' note appears)."""
    from samft.engine.infer.evaluate import evaluate_run, tiling_of

    run = tmp_path / "run"
    shutil.copytree(request.getfixturevalue(which), run)
    tiled = evaluate_run(run, device="cpu", show_progress=False, tile=48)["sets"]["val"]
    assert tiling_of(tiled["scoring"]) == (48, 6)
    whole = evaluate_run(run, device="cpu", show_progress=False, write=False)["sets"]["val"]
    if which == "binary_run":  # (the tiny multi-class run predicts one class everywhere: its tiles change nothing,
        # and it checks the report takes the class ids that tiled multi-class prediction hands over)
        assert whole["metrics"] != tiled["metrics"]  # else this test would not tell tiles from whole images
    html = build_report([run], k=1, device="cpu", show_progress=False)
    assert "now score" not in html and "tiles 48 px overlapping 6 px" in html
    assert len(Page(html).images) >= 1 + 2 + 3 * 2  # the examples drawn from the tiled predictions
