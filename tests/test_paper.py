"""configs/paper/: one config per dataset of the Conv-LoRA paper; scripts/paper_table.py on fabricated runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from samft.config import dump_yaml, load_config

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
# the paper's settings (the reference example's where it says otherwise): (lr, epochs, train.metric)
SETTINGS = {"polyp": (1e-4, 30, "sm"), "cod": (1e-4, 20, "sm"), "isic2017": (1e-4, 30, "iou"),
            "sbu": (1e-4, 10, "ber"), "leaf": (3e-4, 30, "iou"), "road": (3e-4, 20, "iou"),
            "trans10k_v1": (1e-4, 30, "miou"), "trans10k_v2": (1e-4, 30, "miou")}


def test_every_dataset_of_the_paper_has_a_config():
    assert sorted(p.stem for p in PAPER) == sorted(SETTINGS)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_loads_with_the_papers_settings(path):
    cfg = load_config(path)
    head = path.read_text().split("\n")[:12]
    assert head[0].startswith("# ") and "Table" in head[0] + head[1] and any("Data:" in line for line in head)
    assert cfg.model.type == "vit_h" and cfg.model.checkpoint.endswith("sam_vit_h_4b8939.pth")
    assert cfg.peft.method == "conv_lora" and cfg.protocol == "autogluon"
    lr, epochs, metric = SETTINGS[path.stem]
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.metric) == (lr, epochs, metric)
    assert cfg.train.batch_size * cfg.train.accum_steps == 4 and cfg.train.hflip == 0.5
    assert len(cfg.data.classes) == {"trans10k_v1": 3, "trans10k_v2": 12}.get(path.stem, 0)
    if path.stem == "sbu":
        assert (cfg.loss.bce, cfg.loss.iou) == ("balanced", False)
    again = load_config(path, ["protocol=samft"])  # samft's protocol on the same data: one switch away
    assert again.train.batch_size == 4 and again.data.resize == "pad"


def _fake_run(tmp_path: Path, config: str, overrides: list[str], sets: dict) -> Path:
    run = tmp_path / f"{config}-{len(list(tmp_path.iterdir()))}"
    run.mkdir()
    cfg = load_config(ROOT / "configs" / "paper" / f"{config}.yaml", overrides)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    (run / "eval.json").write_text(json.dumps({"sets": {name: {"n_images": 3, "metrics": m}
                                                        for name, m in sets.items()}}))
    return run


def test_paper_table_from_fabricated_runs(tmp_path, capsys):
    table = load_script("paper_table")
    cod = {"Sm": 0.8766, "meanEm": 0.9, "wFm": 0.8, "MAE": 0.05}
    runs = [
        _fake_run(tmp_path, "polyp", [], {"Kvasir": {"Sm": 0.9214, "meanEm": 0.95, "wFm": 0.9, "MAE": 0.02},
                                          "CVC-ClinicDB": {"Sm": 0.93, "meanEm": 0.96, "wFm": 0.91, "MAE": 0.01},
                                          "CVC-300": {"Sm": 0.5}}),
        _fake_run(tmp_path, "cod", [], {"CAMO": cod, "CHAMELEON": cod}),
        _fake_run(tmp_path, "sbu", [], {"SBU-Test": {"BER": 2.345}}),
        _fake_run(tmp_path, "trans10k_v2", [], {"test": {"mIoU": 0.5432}}),
        _fake_run(tmp_path, "polyp", ["peft.method=lora"], {"Kvasir": {"Sm": 0.9}}),
    ]
    leaf = _fake_run(tmp_path, "leaf", ["train.adam_eps=1e-8"], {"leaf": {"iou@0.5": 0.731}})
    assert table.main([str(r) for r in runs] + [f"leaf={leaf}", "--out", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    assert out == (tmp_path / "t.md").read_text()
    lines = out.splitlines()
    assert lines[0].startswith("Table: Protocol: autogluon") and "train.adam_eps=1e-08" in lines[0]
    head = [c.strip() for c in lines[2].strip("|").split("|")]
    assert head[:3] == ["Method", "Polyp CVC-ClinicDB Sα", "Polyp CVC-ClinicDB Eφ"]
    assert "Camouflaged objects Sα" in head and "Shadow (SBU) BER %" in head and "Trans10K-v2 mIoU %" in head
    assert "Leaf disease IoU %" in head and not any("Road" in h or "CVC-300" in h for h in head)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]] for line in lines[4:]}
    assert set(rows) == {"conv_lora", "lora"}
    cells = dict(zip(head[1:], rows["conv_lora"]))
    assert cells["Polyp Kvasir Sα"] == "0.921" and cells["Camouflaged objects Sα"] == "0.877"
    assert cells["Shadow (SBU) BER %"] == "2.35" and cells["Trans10K-v2 mIoU %"] == "54.3"
    assert cells["Leaf disease IoU %"] == "73.1"
    lora = dict(zip(head[1:], rows["lora"]))
    assert lora["Polyp Kvasir Sα"] == "0.900" and lora["Polyp Kvasir Eφ"] == "–" and lora["Shadow (SBU) BER %"] == "–"


def test_paper_table_names_the_protocols_when_runs_mix_them(tmp_path, capsys):
    table = load_script("paper_table")
    a = _fake_run(tmp_path, "sbu", [], {"SBU-Test": {"BER": 2.0}})
    b = _fake_run(tmp_path, "sbu", ["protocol=samft"], {"SBU-Test": {"BER": 3.0}})
    assert table.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "Protocol: autogluon, samft" in out
    assert "| conv_lora [autogluon] | 2.00 |" in out and "| conv_lora [samft] | 3.00 |" in out


def test_paper_table_says_what_it_cannot_place(tmp_path, capsys):
    table = load_script("paper_table")
    run = _fake_run(tmp_path, "leaf", [], {"elsewhere": {"iou@0.5": 0.5}})
    assert table.main([str(run)]) == 2
    assert "cannot tell which of the paper's datasets" in capsys.readouterr().err
    assert table.main([str(tmp_path / "nothing")]) == 2
