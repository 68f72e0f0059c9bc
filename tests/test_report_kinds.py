"""``samft report`` on the runs that have their own sections: a pruned run (its blocks' choices and GMACs equal
``architecture.json`` and ``samft info --json``) and a BRA run (its attention settings equal ``samft info
--json``), both evaluated and predicted by the report as ``samft eval`` predicted them."""

from __future__ import annotations

import json
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from samft.cli import app
from samft.report import build_report

from test_export import make_run

BRA = {"attention": "bra", "bra": {"regions": 2, "topk": 2, "lepe_kernel": 3}}


class Tables(HTMLParser):
    """Every <table> with a class: {(class, data-run): [row: [(cell attributes, text)]]}, and the <p> texts by
    class."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[tuple[str, str], list[list[tuple[dict, str]]]] = {}
        self.paragraphs: dict[str, list[str]] = {}
        self._table = self._row = self._cell = self._p = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "class" in a:
            self._table = self.tables.setdefault((a["class"], a.get("data-run", "")), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = [a, ""]
        elif tag == "p" and "class" in a:
            self._p = [a["class"], ""]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(tuple(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = self._row = None
        elif tag == "p" and self._p is not None:
            self.paragraphs.setdefault(self._p[0], []).append(self._p[1])
            self._p = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
        if self._p is not None:
            self._p[1] += data


def info_json(run: Path) -> dict:
    result = CliRunner().invoke(app, ["info", "--config", str(run / "config.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, str]:
    """A pruned run (2 search steps, no fine-tuning) and a BRA run, each evaluated, and their report side by
    side."""
    from samft.data.synthetic import write_dataset
    from samft.engine.infer.evaluate import evaluate_run
    from samft.engine.train.prune import PruneArgs, prune_run

    root = tmp_path_factory.mktemp("report_kinds")
    data = {"root": str(write_dataset(root / "data", n=8, seed=1)), "train": ".", "val_fraction": 0.25}
    make_run(root / "dense", "lora", data=data)
    pruned = root / "pruned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the search's few steps
        prune_run(PruneArgs(root / "dense", 0.0008, search_steps=2, arch_lr=0.01, out_dir=pruned, device="cpu"))
    bra, _ = make_run(root / "bra", "lora", model=BRA, data=data)
    for run in (pruned, bra):
        evaluate_run(run, device="cpu", show_progress=False)
    return pruned, bra, build_report([pruned, bra], k=1, device="cpu", show_progress=False)


def test_pruned_blocks_and_gmacs_equal_architecture_json_and_info(runs):
    """Mutants: the block GMACs shown with 4 decimals (a tiny block's 0.000244 shows as 0.0002); before and
    after swapped; the summary's target read from pruned_gmacs."""
    pruned, _, html = runs
    page = Tables(html)
    info = info_json(pruned)
    arch = json.loads((pruned / "architecture.json").read_text())
    rows = page.tables[("pruned-blocks", pruned.name)][1:]  # the header row aside
    assert len(rows) == len(info["pruned_blocks"]) == len(arch["architecture"]["blocks"])
    for row, want, saved in zip(rows, info["pruned_blocks"], arch["architecture"]["blocks"]):
        (_, block), (_, attn), (_, mlp), before, after = row
        assert (int(block), attn, mlp) == (want["block"], saved["attn"], f"{saved['mlp_units']}/{want['mlp_units_dense']}")
        assert want["attn"] == saved["attn"] and want["mlp_units"] == saved["mlp_units"]
        for (attrs, text), key in ((before, "gmacs_before"), (after, "gmacs_after")):
            assert float(attrs["data-value"]) == want[key] and text == f"{want[key]:.4g}"
    assert page.paragraphs["pruned-summary"] == [
        f"encoder GMACs: dense {arch['dense_gmacs']:.4g}, target {arch['target_gmacs']:.4g}, "
        f"pruned {arch['pruned_gmacs']:.4g}"]
    assert arch["pruned_gmacs"] == pytest.approx(info["encoder_gmacs"])
    model_row = dict((r[0][1], [c[1] for c in r[1:]]) for r in page.tables[("overview", "")])["model"]
    assert f"encoder {info['encoder_gmacs']:g} GMACs per image" in model_row[0]
    assert "records no validation" in html and "best ? ?" not in html  # prune without fine-tuning: no best metric
    assert "now score" not in html  # the report's predictions of the pruned model reproduce eval.json


def test_bra_settings_equal_info(runs):
    """Mutants: the settings read from the config's defaults (BRAConfig()) rather than the run's; the blocks
    by attention dropped."""
    pruned, bra, html = runs
    page = Tables(html)
    info = info_json(bra)
    shown = {row[0][1]: row[1][1] for row in page.tables[("bra", bra.name)]}
    want = {k: str(v) for k, v in info["attention_options"].items()}
    want["blocks by attention"] = ", ".join(f"{k} x {n}" for k, n in info["attention_blocks"].items())
    want.update({f"new parameters: {k}": f"{n:,}" for k, n in info["attention_params"].items()})
    assert shown == want and want["topk"] == "2" and want["blocks by attention"] == "sdpa x 1, bra x 1"
    assert ("bra", pruned.name) not in page.tables and ("pruned-blocks", bra.name) not in page.tables
