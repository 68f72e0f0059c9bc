"""Compare PEFT methods on your data with the same budget and seeds: the paper's Table 1, on your data.

    python scripts/compare_methods.py --config configs/compare_em_cells.yaml \\
        --methods decoder_only,lora,conv_lora --seeds 0,1,2 --out docs/compare.md [key=value ...]

Every (method, seed) run trains ``FILE`` (+ the overrides) with ``peft.method=<method>`` and
``train.seed=<seed>`` into ``--workdir/<method>/seed<seed>`` (``:`` written ``-`` in the folder name), in its own process (so peak memory is per
run), then is evaluated with ``samft eval``'s evaluation on the config's test sets (or its validation
split). The script writes

- ``OUT`` (Markdown): per test set, each metric's mean ± standard error over the seeds, the trainable
  parameters, the median wall time and the CPU time per optimizer step, and the peak memory (CUDA: max
  allocated; CPU: the run process's peak resident set size, which includes the Python/torch baseline),
  plus the command;
- ``OUT`` with ``.png``: a chart of the first metric (mean ± standard error) and of the metric against
  the trainable parameters;
- ``OUT`` with ``.json``: every run's raw numbers;
- ``OUT`` with ``.html``: ``samft report`` of every run side by side (curves on shared axes, each set's
  metrics, precision-recall or confusion, the worst and best images); ``--no-report`` skips it.

A ``--methods`` entry is a ``peft.method`` name, a named choice of :data:`CHOICES` (``dora``, ``rslora``, ``pissa``,
``olora``: samft's ``lora`` with that variant or init; ``qlora``, ``qlora8``: ``lora`` on an nf4 / int8 encoder) or
``hf:<type>`` (HF peft's method, ``peft.method=hf peft.hf.type=<type>``), each optionally followed by
``@<blocks>`` for its placement (``lora@late:1``: ``peft.blocks=late:1``; a list of indices, whose commas would
split the entry, goes in the config or an override instead); the entry is the row's name.

``--ssl-weight W`` compares each method with and without SLIP's self-supervised loss: every method also
runs as ``<method>+ssl`` with ``loss.ssl.weight=W`` (the config's ``data.unlabelled`` and ``loss.ssl``
give the unlabelled images and the head) into ``--workdir/<method>+ssl/seed<seed>``; the table has a row
for each, and the time per step shows the extra cost.

Hand-written notes survive a regeneration: everything from the line ``NOTES_MARKER`` on in an existing
``OUT`` is kept. Runs are independent: a run whose ``result.json`` was made from the same config file content and
overrides is reused (an interrupted comparison continues), unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULT_FILE = "result.json"
NOTES_MARKER = "<!-- notes: everything from this line on is kept when the file is regenerated -->"
DEFAULT_METRICS = "dice@0.5,iou@0.5,Sm,meanEm,MAE"
SSL_SUFFIX = "+ssl"  # the label of a method's run with loss.ssl.weight (--ssl-weight)


# named --methods entries beyond the registry's names: their overrides
CHOICES = {
    "dora": ["peft.method=lora", "peft.lora.variant=dora"],
    "rslora": ["peft.method=lora", "peft.lora.variant=rslora"],
    "pissa": ["peft.method=lora", "peft.lora.init=pissa"],
    "olora": ["peft.method=lora", "peft.lora.init=olora"],
    "qlora": ["peft.method=lora", "model.quantize=nf4"],
    "qlora8": ["peft.method=lora", "model.quantize=int8"],
}


def choice_overrides(label: str) -> list[str]:
    """The overrides of one ``--methods`` entry (see the module docstring); an unknown method is a SamftError
    naming the nearest one."""
    from samft import peft

    base, _, blocks = label.partition("@")
    if base.startswith("hf:"):
        out = ["peft.method=hf", f"peft.hf.type={base[len('hf:'):]}"]
    elif base in CHOICES:
        out = list(CHOICES[base])
    else:
        peft.get(base)
        out = [f"peft.method={base}"]
    return out + ([f"peft.blocks={blocks}"] if blocks else [])


def run_name(label: str) -> str:
    """The folder of an entry's runs (``hf:loha`` -> ``hf-loha``)."""
    return label.replace(":", "-")


# ------------------------------------------------------------------------------------------------ one run


def run_one(config: str, overrides: list[str], run_dir: Path, device: str, own_process: bool = True,
            label: str = "") -> dict:
    """Train + evaluate one (method, seed) in this process; returns (and writes) its numbers.

    ``own_process``: this process runs nothing else, so its peak memory is the run's.
    """
    import resource

    import torch

    from samft.config import load_config
    from samft.engine.infer.evaluate import evaluate_run
    from samft.engine.train.loop import read_metrics, train
    from samft.engine.artifacts.rundir import METRICS_FILE
    from samft.model import describe

    cfg = load_config(config, overrides)
    cfg.output.dir = str(run_dir)
    cfg.output.overwrite = True
    cfg.train.progress = False
    cfg.train.log_every = 1  # one metrics.csv row per step: its "seconds" is that step's time
    if device != "auto":
        cfg.train.device = device
    t0, c0 = time.perf_counter(), time.process_time()
    train(cfg, show_progress=False)
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    evaluation = evaluate_run(run_dir, device=device, show_progress=False)
    steps = [r for r in read_metrics(run_dir / METRICS_FILE) if r["kind"] == "step" and r["seconds"]]
    step_seconds = [float(r["seconds"]) for r in steps]
    counts = describe(cfg)  # parameter counts from the structure (no weights needed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak, peak_kind = torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
        torch.cuda.reset_peak_memory_stats()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "CPU peak RSS" if own_process else "CPU peak RSS of all runs so far (--in-process)"
    result = {
        "method": label or cfg.peft.method, "seed": cfg.train.seed, "run": str(run_dir),
        "ssl_weight": cfg.loss.ssl.weight,
        "sets": {name: s["metrics"] for name, s in evaluation["sets"].items()},
        "n_images": {name: s["n_images"] for name, s in evaluation["sets"].items()},
        "trainable_params": counts["trainable_params"], "adapter_params": counts["adapter_params"],
        "steps": len(step_seconds), "step_seconds_median": statistics.median(step_seconds) if step_seconds else math.nan,
        "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
        "cpu_seconds_per_step": train_cpu_seconds / max(1, len(step_seconds)), "peak_mib": peak, "peak_kind": peak_kind,
    }
    result["request"] = request_key(config, overrides)
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


def request_key(config: str, overrides: list[str]) -> dict:
    """What a run was asked for (the config file's content and the overrides): a stored run is reused
    only when this is unchanged."""
    import hashlib

    return {"config_sha256": hashlib.sha256(Path(config).read_bytes()).hexdigest(), "overrides": list(overrides)}


# ------------------------------------------------------------------------------------------------ aggregate


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); nan for a single value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def _fmt(mean: float, se: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{mean:.{digits}f}"


def summarise(results: list[dict], methods: list[str], metrics: list[str]) -> dict:
    """{set: {method: {metric: (mean, se)} + params/time/memory}}."""
    sets = sorted({s for r in results for s in r["sets"]})
    out: dict = {}
    for set_name in sets:
        out[set_name] = {}
        for m in methods:
            runs = [r for r in results if r["method"] == m and set_name in r["sets"]]
            if not runs:
                continue
            row = {k: mean_se([r["sets"][set_name].get(k, math.nan) for r in runs]) for k in metrics}
            row["seeds"] = len(runs)
            row["n_images"] = runs[0]["n_images"][set_name]
            row["trainable_params"] = runs[0]["trainable_params"]
            row["adapter_params"] = runs[0]["adapter_params"]
            row["step_ms"] = mean_se([1000 * r["step_seconds_median"] for r in runs])
            row["cpu_step_ms"] = mean_se([1000 * r.get("cpu_seconds_per_step", math.nan) for r in runs])
            row["peak_mib"] = max(r["peak_mib"] for r in runs)
            row["peak_kind"] = runs[0]["peak_kind"]
            out[set_name][m] = row
    return out


def markdown(summary: dict, metrics: list[str], header: str) -> str:
    lines = [header, ""]
    for set_name, rows in summary.items():
        first = next(iter(rows.values()))
        lines += [f"### Test set `{set_name}` ({first['n_images']} images, {first['seeds']} seed(s) per method)", ""]
        cols = ["method", *metrics, "trainable params", "of which encoder", "time / step (ms)",
                "CPU time / step (ms)", f"peak memory (MiB, {first['peak_kind']})"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|---|" + "---:|" * (len(cols) - 1))
        for m, row in rows.items():
            cells = [f"`{m}`", *(_fmt(*row[k]) for k in metrics), f"{row['trainable_params']:,}",
                     f"{row['adapter_params']:,}", _fmt(*row["step_ms"], digits=0), _fmt(*row["cpu_step_ms"], digits=0),
                     f"{row['peak_mib']:,.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def chart(summary: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    set_name, rows = next(iter(summary.items()))
    names = list(rows)
    means = [rows[m][metric][0] for m in names]
    errs = [0.0 if math.isnan(rows[m][metric][1]) else rows[m][metric][1] for m in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    axes[0].bar(range(len(names)), means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
    axes[0].set_xticks(range(len(names)), names, rotation=30, ha="right")
    finite = [(v, e) for v, e in zip(means, errs) if not math.isnan(v)]
    if finite:
        lo, hi = min(v - e for v, e in finite), max(v + e for v, e in finite)
        pad = max(0.01, (hi - lo) * 0.15)
        axes[0].set_ylim(0.0 if lo >= 0 else lo - pad, hi + pad)  # bars start at 0: no exaggerated differences
    axes[0].set_ylabel(f"{metric} (mean ± s.e.)")
    axes[0].set_title(f"{metric} on '{set_name}'")
    params = [rows[m]["adapter_params"] for m in names]  # what the methods differ in (the decoder is common)
    axes[1].errorbar(params, means, yerr=errs, fmt="o", capsize=3)
    for x, y, n in zip(params, means, names):
        axes[1].annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[1].set_xscale("symlog", linthresh=100)
    axes[1].set_xlabel("trainable encoder parameters (adapters; symlog)")
    axes[1].set_ylabel(metric)
    axes[1].set_title(f"{metric} vs trainable encoder parameters (+ the decoder for all)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train and evaluate several PEFT methods with the same budget and seeds.")
    p.add_argument("overrides", nargs="*", help="key=value config overrides applied to every run")
    p.add_argument("--config", required=True, help="YAML config (data, model, train budget)")
    p.add_argument("--methods", required=True, help="comma-separated peft.method names, named choices (dora, "
                   "pissa, qlora, ...), hf:<type>, each optionally @<blocks> (lora@late:1)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values (default 0,1,2)")
    p.add_argument("--metrics", default=DEFAULT_METRICS, help=f"eval.json metrics to tabulate (default {DEFAULT_METRICS})")
    p.add_argument("--out", default="compare.md", help="Markdown output (the chart is OUT with .png, raw runs .json)")
    p.add_argument("--workdir", default="runs/compare", help="where the runs are written")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already have a result")
    p.add_argument("--in-process", action="store_true",
                   help="run every training in this process (quicker for small runs; CPU peak memory is then "
                        "cumulative, not per run)")
    p.add_argument("--ssl-weight", type=float, default=0.0,
                   help="also run every method with loss.ssl.weight=W (rows <method>+ssl; needs data.unlabelled)")
    p.add_argument("--no-report", action="store_true", help="do not write OUT with .html (samft report of the runs)")
    p.add_argument("--run-one", nargs=2, metavar=("LABEL", "SEED"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_child(cmd: list[str], env: dict) -> int:
    """Run one child training; SIGTERM to this script stops the child too (then exits 128 + 15)."""
    import signal

    proc = subprocess.Popen(cmd, env=env)

    def stop(signum, frame):
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from samft.config import load_config
    from samft.errors import SamftError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"error: --seeds {args.seeds!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    workdir = Path(args.workdir)

    def overrides_for(label: str, seed: int) -> list[str]:
        method, ssl = label.removesuffix(SSL_SUFFIX), label.endswith(SSL_SUFFIX)
        return [*args.overrides, *choice_overrides(method), f"train.seed={seed}",
                *([f"loss.ssl.weight={args.ssl_weight}"] if ssl else [])]

    try:
        if not methods or not seeds:
            raise SamftError("--methods and --seeds must each name at least one value")
        for m in methods:
            choice_overrides(m)
        if args.ssl_weight < 0:
            raise SamftError(f"--ssl-weight {args.ssl_weight}: expected a positive weight (0 = no SSL rows)")
        if args.ssl_weight > 0:
            methods = [v for m in methods for v in (m, m + SSL_SUFFIX)]
        for label in methods:
            load_config(args.config, overrides_for(label, seeds[0]))  # fail early on a bad config or entry
        if args.run_one:
            label, seed = args.run_one[0], int(args.run_one[1])
            run_one(args.config, overrides_for(label, seed), workdir / run_name(label) / f"seed{seed}", args.device,
                    label=label)
            return 0
    except SamftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    results = []
    started = time.time()
    for method in methods:
        for seed in seeds:
            run_dir = workdir / run_name(method) / f"seed{seed}"
            done = run_dir / RESULT_FILE
            stored = json.loads(done.read_text()) if done.is_file() else None
            if args.fresh or stored is None or stored.get("request") != request_key(args.config,
                                                                                   overrides_for(method, seed)):
                print(f"[{time.time() - started:7.1f}s] {method} seed {seed} -> {run_dir}", flush=True)
                if args.in_process:
                    try:
                        run_one(args.config, overrides_for(method, seed), run_dir, args.device, own_process=False,
                                label=method)
                    except SamftError as e:
                        print(f"error: run {method} seed {seed}: {e}", file=sys.stderr)
                        return 2
                    results.append(json.loads(done.read_text()))
                    continue
                cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--run-one", method, str(seed)]
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
                returncode = run_child(cmd, env)
                if returncode != 0:
                    print(f"error: run {method} seed {seed} failed (exit {returncode})", file=sys.stderr)
                    return returncode
            results.append(json.loads(done.read_text()))
    summary = summarise(results, methods, metrics)
    out = Path(args.out)
    command = "python scripts/compare_methods.py " + " ".join(shlex.quote(a) for a in argv)
    import torch

    from samft import __version__

    device = torch.cuda.get_device_name(0) if args.device != "cpu" and torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores visible)"
    header = (f"Command: `{command}`\n\nsamft {__version__}, torch {torch.__version__}, {device}; "
              f"{len(methods)} methods x {len(seeds)} seeds, {sum(r['train_seconds'] for r in results):.0f} s of "
              f"training in total. Metrics: mean ± standard error over seeds. Time / step: the median wall time of a "
              f"training step (metrics.csv), mean ± s.e. over seeds; CPU time / step: the run process's CPU time "
              f"(all threads) over its whole training (model building and the final validation included) per "
              f"step, which other processes on the machine disturb much less than the wall time.")

    out.parent.mkdir(parents=True, exist_ok=True)
    kept = out.read_text().partition(NOTES_MARKER)[1:] if out.is_file() else ("", "")
    out.write_text(markdown(summary, metrics, header) + ("\n" + "".join(kept) if kept[0] else ""))
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    chart(summary, metrics[0], out.with_suffix(".png"))
    print(out.read_text())
    written = [out, out.with_suffix(".png"), out.with_suffix(".json")]
    if not args.no_report:
        from samft.report import write_report

        runs = [workdir / run_name(method) / f"seed{seed}" for method in methods for seed in seeds]
        try:
            written.append(write_report(runs, out.with_suffix(".html"), k=2, device=args.device,
                                        title=f"compare_methods: {', '.join(methods)}"))
        except SamftError as e:
            print(f"error: the report: {e}", file=sys.stderr)
            return 2
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
