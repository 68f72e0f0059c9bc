"""The Conv-LoRA paper's results tables (method x dataset, the paper's metric per dataset) from samft runs.

    python scripts/paper_table.py runs/paper/polyp runs/paper/cod ...           # finished runs (eval.json)
    python scripts/paper_table.py --train configs/paper/*.yaml --workdir runs/paper [key=value ...]
    python scripts/paper_table.py polyp=runs/x ... --out docs/paper_table.md     # name a run's dataset

A run is a directory holding ``config.yaml`` and ``eval.json`` (``samft train`` + ``samft eval``). Its dataset
is named ``NAME=DIR``, or recognised from its test sets (binary) or its number of classes (multi-class), see
``DATASETS``. ``--train`` first trains and evaluates each config into ``WORKDIR/<config stem>`` (a run whose
``eval.json`` exists is reused unless ``--fresh``), in this process, one after the other.

Rows are methods (``peft.method``; the backbone when it is not ViT-H, the protocol when runs mix protocols);
columns the paper's tasks with the metrics the reference example (``autogluon/examples/automm/Conv-LoRA``)
reports for them. The caption names the protocol (``protocol: samft | autogluon``) and any option a run
sets away from its protocol. A missing number is "–".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Dataset(NamedTuple):
    title: str
    sets: tuple[str, ...]  # test sets shown (eval.json names), in order
    metrics: tuple[str, ...]  # eval.json metric names
    classes: int = 0  # multi-class tasks are recognised by their number of classes


DATASETS: dict[str, Dataset] = {
    "polyp": Dataset("Polyp", ("CVC-ClinicDB", "Kvasir"), ("Sm", "meanEm", "wFm", "MAE")),
    "cod": Dataset("Camouflaged objects", ("CAMO",), ("Sm", "meanEm", "wFm", "MAE")),
    "isic2017": Dataset("ISIC 2017", ("ISIC2017",), ("iou@0.5",)),
    "sbu": Dataset("Shadow (SBU)", ("SBU-Test",), ("BER",)),
    "leaf": Dataset("Leaf disease", ("leaf",), ("iou@0.5",)),
    "road": Dataset("Road (Massachusetts)", ("road",), ("iou@0.5",)),
    "trans10k_v1": Dataset("Trans10K-v1", ("test",), ("mIoU",), classes=3),
    "trans10k_v2": Dataset("Trans10K-v2", ("test",), ("mIoU",), classes=12),
}
# header, scale, decimals: S-measure etc. as fractions (the COD/polyp convention), IoU in percent, BER is percent
SHOWN = {"Sm": ("Sα", 1, 3), "meanEm": ("Eφ", 1, 3), "wFm": ("Fβw", 1, 3), "MAE": ("MAE", 1, 3),
         "iou@0.5": ("IoU %", 100, 1), "mIoU": ("mIoU %", 100, 1), "BER": ("BER %", 1, 2)}


class Run(NamedTuple):
    path: Path
    dataset: str
    method: str
    protocol: str
    away: dict  # options set away from the protocol: {dotted: (value, protocol's)}
    sets: dict  # eval.json "sets"


def recognise(cfg, sets: dict) -> Optional[str]:
    """The DATASETS key of a run: by number of classes (multi-class) or by a test set's name (binary)."""
    n = len(cfg.data.classes)
    for name, d in DATASETS.items():
        if (d.classes and d.classes == n) or (not d.classes and not n and set(d.sets) & set(sets)):
            return name
    return None


def read_run(arg: str) -> Run:
    """``DIR`` or ``NAME=DIR`` -> the run's dataset, method, protocol and eval.json sets."""
    from samft.engine.artifacts.rundir import EVAL_FILE, read_run_config
    from samft.errors import SamftError
    from samft.config.protocol import differences

    name, _, path = arg.rpartition("=") if "=" in arg else ("", "", arg)
    path = Path(path)
    cfg = read_run_config(path)
    if not (path / EVAL_FILE).is_file():
        raise SamftError(f"{path}: no {EVAL_FILE} (run samft eval --run {path} first)")
    sets = json.loads((path / EVAL_FILE).read_text()).get("sets", {})
    name = name or recognise(cfg, sets)
    if name not in DATASETS:
        raise SamftError(f"{path}: cannot tell which of the paper's datasets this run is "
                         f"({name or 'unrecognised'}); name it as NAME={path} with NAME one of {', '.join(DATASETS)}")
    method = cfg.peft.method + ("" if cfg.model.type == "vit_h" else f" ({cfg.model.type})")
    return Run(path, name, method, cfg.protocol, differences(cfg), sets)


def _cell(run: Optional[Run], test_set: str, metric: str) -> str:
    value = (run.sets.get(test_set) or {}).get("metrics", {}).get(metric) if run else None
    if value is None or value != value:  # missing or NaN
        return "–"
    _, scale, decimals = SHOWN.get(metric, (metric, 1, 3))
    return f"{value * scale:.{decimals}f}"


def _caption(runs: list[Run]) -> str:
    protocols = sorted({r.protocol for r in runs})
    text = f"Protocol: {', '.join(protocols)} (samft's `protocol` option; README, \"Reproducing the paper\")."
    away = sorted({f"{k}={v[0]}" for r in runs for k, v in r.away.items()})
    if away:
        text += f" Options set away from the protocol: {', '.join(away)}."
    return (text + " Metrics as the reference example reports them; Sα, Eφ (mean), Fβw and MAE from pysodmetrics, "
            "IoU per image at 0.5, BER in percent, mIoU over classes; best checkpoint by the config's train.metric.")


def markdown_table(runs: list[Run]) -> str:
    """The Markdown table: a row per method, the paper's columns of every dataset that has a run."""
    used = [name for name in DATASETS if any(r.dataset == name for r in runs)]
    mixed = len({r.protocol for r in runs}) > 1
    label = lambda r: r.method + (f" [{r.protocol}]" if mixed else "")  # noqa: E731
    rows = list(dict.fromkeys(label(r) for r in runs))
    columns = [(name, s, m) for name in used for s in DATASETS[name].sets for m in DATASETS[name].metrics]
    head = ["Method"] + [f"{DATASETS[n].title}" + (f" {s}" if len(DATASETS[n].sets) > 1 else "")
                         + f" {SHOWN.get(m, (m,))[0]}" for n, s, m in columns]
    lines = [f"Table: {_caption(runs)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        by_dataset = {r.dataset: r for r in runs if label(r) == row}
        cells = [_cell(by_dataset.get(n), s, m) for n, s, m in columns]
        lines.append("| " + " | ".join([row] + cells) + " |")
    return "\n".join(lines) + "\n"


def train_configs(configs: list[str], workdir: Path, overrides: list[str], fresh: bool) -> list[str]:
    """Train and evaluate each config into ``workdir/<stem>``; returns ``NAME=DIR`` for each."""
    from samft.config import load_config
    from samft.engine.infer.evaluate import evaluate_run
    from samft.engine.artifacts.rundir import EVAL_FILE
    from samft.engine.train.loop import train

    out = []
    for config in configs:
        run_dir = workdir / Path(config).stem
        if fresh or not (run_dir / EVAL_FILE).is_file():
            cfg = load_config(config, overrides)
            cfg.output.dir, cfg.output.overwrite = str(run_dir), True
            train(cfg)
            evaluate_run(run_dir)
        name = Path(config).stem
        out.append(f"{name}={run_dir}" if name in DATASETS else str(run_dir))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    from samft.errors import SamftError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", help="run directories (DIR or NAME=DIR), or configs with --train; "
                                                 "key=value items are overrides for --train")
    parser.add_argument("--train", action="store_true", help="train and evaluate the given configs first")
    parser.add_argument("--workdir", default="runs/paper", help="where --train writes its runs")
    parser.add_argument("--fresh", action="store_true", help="retrain even when a run's eval.json exists")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    try:
        if args.train:
            configs = [i for i in args.items if i.endswith((".yaml", ".yml"))]
            overrides = [i for i in args.items if i not in configs]
            items = train_configs(configs, Path(args.workdir), overrides, args.fresh)
        else:
            items = args.items
        if not items:
            raise SamftError("no runs given: pass run directories, or configs with --train")
        table = markdown_table([read_run(i) for i in items])
    except SamftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
