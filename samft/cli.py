"""The ``samft`` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer

from samft.errors import SamftError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune Segment Anything for semantic segmentation with Conv-LoRA and other PEFT methods.")


def _version(value: bool) -> None:
    if value:
        from samft.version import __version__

        print(f"samft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Fine-tune Segment Anything for semantic segmentation with Conv-LoRA and other PEFT methods."""


def _console():
    from samft.progress import console

    return console


def _e(value: object) -> str:
    """A value shown inside rich markup, its own brackets kept (file names like scan[bad].png, hints like
    samft[onnx], shapes like [image, mask])."""
    from rich.markup import escape

    return escape(str(value))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _console().print(f"[yellow]warning:[/] {_e(message)}")


def user_errors(fn: Callable) -> Callable:
    """Print a user error as one line (no traceback) and exit non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _show_warning if _rank() == 0 else (lambda *a, **k: None)  # torchrun: rank 0 warns
        try:
            return fn(*args, **kwargs)
        except SamftError as e:
            interrupted = type(e).__name__ == "TrainingInterrupted"
            label = "error"
            if _world_size() > 1:  # under torchrun: say which process, and tell torchrun's summary
                label = f"error (rank {_rank()})"
                if not interrupted:  # stopped because another process failed: not the cause
                    from samft.engine.distributed import record_error

                    record_error(f"{type(e).__name__}: {e}")
            _console().print(f"[bold red]{label}:[/] {_e(e)}")
            raise typer.Exit(130 if interrupted else 2) from None
        except KeyboardInterrupt:
            _console().print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _parse_named(items: Optional[List[str]], option: str) -> dict[str, str]:
    named = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0]:
            raise SamftError(f"{option} {item!r}: expected NAME=PATH")
        name, path = item.split("=", 1)
        named[name] = path
    return named


@app.command()
@user_errors
def train(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. train.lr=3e-4"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this directory"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars"),
) -> None:
    """Fine-tune SAM on a dataset; writes a run directory (config, adapter, state, metrics, plots)."""
    from samft.config import load_config
    from samft.engine.artifacts.rundir import read_run_config
    from samft.engine.train.loop import train as run_training

    if resume is not None:
        if config is not None:
            _console().print(f"note: --resume uses {resume}/config.yaml; --config {config} is not read", markup=False)
        cfg = read_run_config(resume, overrides)
        cfg.output.dir = str(resume)
    elif config is not None:
        cfg = load_config(config, overrides)
    else:
        raise SamftError("train needs --config FILE (or --resume RUN_DIR)")
    if no_progress:
        cfg.train.progress = False
    run_dir = run_training(cfg, resume=resume is not None, show_progress=cfg.train.progress)
    if _rank() == 0:
        _console().print(f"[green]done:[/] {_e(run_dir)}")


@app.command("eval")
@user_errors
def eval_(
    run: Optional[Path] = typer.Option(None, "--run", "--run-dir", help="run directory (default: the newest under "
                                       "runs/); --run-dir is the same, for torchrun, which takes --run itself"),
    data: Optional[List[str]] = typer.Option(None, "--data", help="NAME=PATH test set (folder or CSV); repeatable"),
    as_json: bool = typer.Option(False, "--json", help="print eval.json to stdout"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    tile: Optional[int] = typer.Option(None, "--tile", help="score large images by overlapping SIZE x SIZE tiles "
                                       "at native resolution (as samft predict --tile)"),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="tile overlap in pixels (default SIZE/8)"),
) -> None:
    """Evaluate a run at each image's original resolution; writes RUN/eval.json (MODEL.eval.json for an exported
    model file)."""
    from samft.engine.infer.evaluate import evaluate_run
    from samft.engine.artifacts.rundir import eval_path, newest_run

    run_dir = run or newest_run()
    named = {k: str(Path(v).expanduser().resolve()) for k, v in _parse_named(data, "--data").items()}  # from cwd
    results = evaluate_run(run_dir, named or None, device, show_progress=not as_json, tile=tile, overlap=overlap)
    if _rank() != 0:  # under torchrun: rank 0 prints
        return
    if as_json:
        print(json.dumps(results, indent=2))
        return
    _print_metrics_table(f"{run_dir} (config {results['config_hash']}, {results['protocol']})", results["sets"],
                         results.get("evaluated"))
    _print_worst(results["sets"], eval_path(run_dir).parent)
    _console().print(f"written: {eval_path(run_dir)}", markup=False)


def _table_extras(sets: dict, evaluated: Optional[float]) -> dict[str, dict[str, str]]:
    """The extra columns of the metrics table, each {set: cell}: ``evaluated`` (now / earlier) when some set
    comes from an earlier evaluation, ``scoring`` when the sets differ in it."""
    when = {s: "now" if r.get("evaluated") == evaluated else "earlier" for s, r in sets.items()}
    scoring = {s: _e(r.get("scoring", "")) for s, r in sets.items()}
    extras = {}
    if evaluated is not None and "earlier" in when.values():
        extras["evaluated"] = when
    if len(set(scoring.values())) > 1:
        extras["scoring"] = scoring
    return extras


def _print_metrics_table(title: str, sets: dict, evaluated: Optional[float] = None) -> None:
    """One row per set, one column per metric (stdout). ``evaluated``: this evaluation's time; sets of earlier
    evaluations (another time) are marked, and each set's scoring shown when the sets differ in it."""
    from rich.console import Console
    from rich.table import Table

    names = list(dict.fromkeys(n for r in sets.values() for n in r["metrics"]))
    extras = _table_extras(sets, evaluated)
    table = Table(title=title)
    for column in ("set", "images", *extras):
        table.add_column(column, justify="right" if column == "images" else "left")
    for n in names:
        table.add_column(n, justify="right")
    for set_name, r in sets.items():
        table.add_row(_e(set_name), str(r["n_images"]), *(cells[set_name] for cells in extras.values()),
                      *(f"{r['metrics'][n]:.4f}" if n in r["metrics"] else "-" for n in names))
    Console(width=max(120, 12 * (len(names) + 2 + len(extras)))).print(table)


def _print_worst(sets: dict, folder: Path) -> None:
    """The worst images of each set (its eval.json entry's ``worst``), and where the per-image results are
    (``per_image``, relative to eval.json's ``folder``)."""
    say = functools.partial(_console().print, markup=False)
    for set_name, r in sets.items():
        worst, key = r.get("worst"), r.get("sorted_by")
        if not worst or not key:
            continue
        listed = ", ".join(f"{w.get('image')} {w[key]:.4f}" if isinstance(w.get(key), (int, float)) else
                           f"{w.get('image')} -" for w in worst if isinstance(w, dict))
        where = f" (every image: {folder / r['per_image']})" if isinstance(r.get("per_image"), str) else ""
        say(f"worst of {set_name} by {key}: {listed}{where}")


@app.command()
@user_errors
def predict(
    inputs: Optional[List[str]] = typer.Argument(None, help="images, folders or glob patterns (or --split)"),
    split: Optional[str] = typer.Option(None, "--split", help="predict the images of the run's own split (val or "
                                        "train, from its split.json) instead of INPUTS"),
    run: Optional[Path] = typer.Option(None, "--run", "--run-dir", help="run directory (default: the newest under "
                                       "runs/); --run-dir is the same, for torchrun, which takes --run itself"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default RUN/predictions)"),
    with_overlay: bool = typer.Option(False, "--overlay", help="also write image+mask overlays to OUT/overlays/"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing files in OUT (input images are "
                                   "never written to)"),
    tile: Optional[int] = typer.Option(None, "--tile", help="predict large images by overlapping SIZE x SIZE tiles "
                                       "at native resolution, blended (smaller images: one tile, as without)"),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="tile overlap in pixels (default SIZE/8)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="image-decoding processes "
                                          "(default: the run's data.num_workers)"),
    probs: Optional[str] = typer.Option(None, "--probs", help="also write probability maps to OUT/probs/: npy "
                                        "(float16; binary (H, W) foreground probability, multi-class (C, H, W) class "
                                        "scores) or png16 (16-bit PNG of the probability; multi-class: NAME/<class "
                                        "id>.png, each class's share of the scores)"),
) -> None:
    """Predict masks (0/255 PNG at the original size, named after each input; same stems get distinct names).
    Under torchrun each process predicts its share of the images."""
    import time

    from samft.engine.infer.predict import predict_run
    from samft.engine.artifacts.rundir import newest_run

    from samft.engine.infer.predict import split_inputs

    run_dir = run or newest_run()
    if bool(inputs) == bool(split):
        raise SamftError("predict needs images (files, folders or globs) or --split val|train, one of the two")
    t0 = time.perf_counter()
    written = predict_run(run_dir, inputs or split_inputs(run_dir, split), out, with_overlay, device,
                          overwrite=overwrite, tile=tile, overlap=overlap, workers=workers, probs=probs)
    seconds = max(time.perf_counter() - t0, 1e-9)
    if _rank() != 0:  # under torchrun: rank 0 reports, for all the processes
        return
    rate = len(written) / max(getattr(written, "predict_seconds", 0.0), 1e-9)
    _console().print(f"[green]wrote {len(written)} mask(s)[/] to {_e(written[0].parent if written else out)} in "
                     f"{seconds:.1f} s ({len(written) / seconds:.1f} images/s with model loading, "
                     f"{rate:.1f} images/s predicting)")
    if probs and written:
        _console().print(f"probability maps ({probs}) in {_e(written[0].parent / 'probs')}")


@app.command()
@user_errors
def export(
    merged: Optional[Path] = typer.Option(None, "--merged", help="output file, e.g. model.pth"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="output ONNX file, e.g. model.onnx: the whole model, "
                                        "normalised image -> mask logits / class scores (needs samft[onnx])"),
    run: Optional[Path] = typer.Option(None, "--run", help="run directory (default: the newest under runs/)"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (14-20)"),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="ONNX: any batch size (default: 1)"),
    image: Optional[Path] = typer.Option(None, "--image", help="ONNX: a real image to verify on besides a random one"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file (a run's own files "
                                   "never)"),
) -> None:
    """Fold the adapters into SAM's weights (LoRA, SSF, BitFit ...) and write a plain SAM checkpoint plus
    the decoder head (--merged); for methods that cannot be merged, say so and write the unmerged model.
    --onnx writes the whole model as one ONNX graph, checked against PyTorch with onnxruntime."""
    from samft.engine.artifacts.rundir import newest_run

    if merged is None and onnx is None:
        raise SamftError("export needs --merged FILE and/or --onnx FILE")
    run_dir = run or newest_run()
    if merged is not None:
        from samft.engine.artifacts.export import export_run

        result = export_run(run_dir, merged, overwrite=overwrite)
        _console().print(("[green]" if result.merged else "[yellow]") + _e(result.message()) + "[/]")
    if onnx is not None:
        from samft.engine.artifacts.onnx_export import export_onnx

        result = export_onnx(run_dir, onnx, opset, dynamic_batch, image, overwrite=overwrite)
        _console().print(f"[green]{_e(result.message())}[/]")


@app.command()
@user_errors
def prune(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value for the pruned run's config (its "
                                                    "fine-tuning), e.g. train.lr=1e-4"),
    target_gmacs: Optional[float] = typer.Option(None, "--target-gmacs", help="encoder GMACs per image (ViT-B dense: "
                                                 "486); not needed with --resume"),
    run: Optional[Path] = typer.Option(None, "--run", help="run directory (default: the newest under runs/)"),
    search_epochs: Optional[int] = typer.Option(None, "--search-epochs", help="search passes over the training split"),
    search_steps: Optional[int] = typer.Option(None, "--search-steps", help="search steps (instead of epochs)"),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", help="fine-tuning epochs after pruning (the normal "
                                        "training loop)"),
    out: Optional[Path] = typer.Option(None, "--out", help="new run directory (default: RUN-pruned)"),
    arch_lr: float = typer.Option(5e-4, "--arch-lr", help="learning rate of the gate thresholds"),
    lam: Optional[float] = typer.Option(None, "--lambda", help="FLOPs-loss weight (default: samft's rule, "
                                       "the FLOPs loss starting at 1.1x the task loss; the SPViT authors fix it per "
                                       "model in their configs)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a run samft made in --out (never a "
                                   "folder samft did not create)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue this pruned run: its saved search (give "
                                          "the same --run, --target-gmacs and search options) or its fine-tuning"),
    search_save_every: int = typer.Option(100, "--search-save-every", min=1, help="save the search's state every "
                                          "N steps (for --resume)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars"),
) -> None:
    """SPViT: prune the run's encoder to --target-gmacs (attention -> derived convs or skip, fewer MLP
    units), fine-tune, and write a new run directory."""
    from samft.engine.artifacts.rundir import newest_run
    from samft.prune.rebuild import summary
    from samft.engine.train.prune import PruneArgs, prune_run

    finished = resume is not None and (resume / "pruned.safetensors").is_file()
    if search_epochs is None and search_steps is None and not finished:
        search_epochs = 1
        warnings.warn("prune: neither --search-epochs nor --search-steps given: searching for 1 epoch", stacklevel=1)
    if target_gmacs is None and not finished:
        raise SamftError("prune needs --target-gmacs (or --resume PRUNED_RUN of a finished search)")
    source = None if finished else (run or newest_run())
    args = PruneArgs(run_dir=source, target_gmacs=target_gmacs, search_steps=search_steps,
                     search_epochs=search_epochs, finetune_epochs=finetune_epochs, out_dir=resume or out,
                     arch_lr=arch_lr, lam=lam, device=device, overwrite=overwrite, overrides=overrides,
                     resume=resume is not None, show_progress=not no_progress, search_save_every=search_save_every)
    report = prune_run(args)
    c = _console()
    say = functools.partial(c.print, markup=False)  # plain text: names and values keep their brackets
    say(f"architecture   {summary(report.arch)}")
    say(f"encoder GMACs  {report.dense_gmacs:.4g} -> {report.pruned_gmacs:.4g}  {_target_line(report)}")
    for stage, values in report.metrics.items():
        say(f"{stage:14s} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    c.print(f"[green]wrote[/] {_e(report.out_dir)}")


def _target_line(report) -> str:
    """'target T: reached (x % under)' or 'target T: NOT reached (x % over)', and what the thresholds alone gave."""
    gap = (report.pruned_gmacs - report.target_gmacs) / report.target_gmacs
    said = "reached" if report.pruned_gmacs <= report.target_gmacs else "NOT reached"
    line = f"(target {report.target_gmacs:.4g}: {said}, {abs(gap):.1%} {'over' if gap > 0 else 'under'}"
    if report.search_gmacs is not None and abs(report.search_gmacs - report.pruned_gmacs) > 1e-12:
        line += f"; the thresholds alone fixed {report.search_gmacs:.4g}, the gates' order the rest"
    return line + ")"


@app.command()
@user_errors
def info(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON object"),
) -> None:
    """Show the model, attention, PEFT method, adapted modules, parameter counts and encoder GMACs of a config."""
    from samft.config import load_config
    from samft.model import describe

    cfg = load_config(config, overrides)
    result = describe(cfg)  # structure only: counting needs no weights
    if as_json:
        print(json.dumps(result, indent=2))
        return
    c = _console()
    say = functools.partial(c.print, markup=False)  # plain text: option lists keep their brackets
    adapted = result["adapted_modules"]
    say(f"model          {cfg.model.type} @ {cfg.model.img_size}px (checkpoint: {cfg.model.checkpoint})")
    if result["checkpoint_note"]:
        _console().print(f"[yellow]warning:[/] {_e(result['checkpoint_note'])}")
    blocks = ", ".join(f"{k} x {n}" for k, n in result["attention_blocks"].items())
    options = f" {result['attention_options']}" if result["attention_options"] else ""
    say(f"attention      {result['attention']}{options} (blocks: {blocks})")
    if result["attention_params"]:
        new = ", ".join(f"{k} {n:,}" for k, n in result["attention_params"].items())
        say(f"attn params    {sum(result['attention_params'].values()):,} new, trainable ({new})")
    say(f"encoder        {result['encoder_gmacs']:,} GMACs forward per image at {cfg.model.img_size}px")
    say(f"peft           {cfg.peft.method} {result['peft_options']} (mergeable: {result['mergeable']})")
    if cfg.model.quantize != "none":
        say(f"quantize       {cfg.model.quantize}: the encoder blocks' linear weights (bitsandbytes; weight memory: "
            f"python scripts/quant_memory.py)")
    if cfg.peft.method == "hf":
        from samft.config.names import HF_PEFT_TYPES

        say(f"peft.hf.type   {cfg.peft.hf.type} (of {', '.join(HF_PEFT_TYPES)}; trainable counts of each: "
            f"python scripts/method_table.py)")
    say(f"peft blocks    {result['peft_blocks']} (peft.blocks={cfg.peft.blocks}); mask decoder: {result['decoder']}")
    say(f"adapted        {len(adapted)}" + (f": {adapted[0]} ... {adapted[-1]}" if adapted else " (nothing wrapped)"))
    say(f"class head     {result['class_head']}")
    say(f"trainable      {result['trainable_params']:,} ({result['trainable_percent']}%) = "
            f"adapters {result['adapter_params']:,} + decoder {result['decoder_params']:,}")
    say(f"total          {result['total_params']:,}")
    if "pruned_blocks" in result:
        say(f"pruned         {result['pruned_architecture']}; encoder GMACs {result['encoder_gmacs_dense']:.4g} -> "
                f"{result['encoder_gmacs']:.4g}")
        for b in result["pruned_blocks"]:
            say(f"  block {b['block']:<3d}  {b['attn']:5s}  MLP {b['mlp_units']}/{b['mlp_units_dense']}  GMACs "
                    f"{b['gmacs_before']:.4g} -> {b['gmacs_after']:.4g}")


@app.command()
@user_errors
def score(
    pred: Path = typer.Option(..., "--pred", help="folder of prediction maps (grey 0-255, 16-bit, float TIFF or .npy)"),
    gt: Path = typer.Option(..., "--gt", help="folder of ground-truth masks (matched to predictions by file stem)"),
    threshold: float = typer.Option(0.5, "--threshold", help="probability threshold in [0, 1] of dice, iou and BER (named after it: dice@0.3 ...)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON object"),
) -> None:
    """Score saved prediction maps (any method's) against ground truth with samft's metrics."""
    from samft.engine.infer.score import score_folders

    result = score_folders(pred, gt, threshold, show_progress=not as_json)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _print_metrics_table(f"{pred} vs {gt}", {"scored": {"n_images": result["n_images"], "metrics": result["metrics"]}})
    if result["resized"]:
        _console().print(f"note: {result['resized']} prediction(s) resized to their mask's size", markup=False)


data_app = typer.Typer(no_args_is_help=True, help="Dataset tools.")
app.add_typer(data_app, name="data")


@data_app.command("check")
@user_errors
def data_check(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file"),
    quick: bool = typer.Option(False, "--quick", help="paths and sizes only (no decoding)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON object"),
) -> None:
    """Validate every split (pairs, sizes, mask values, unreadable files) before a long run."""
    from samft.config import load_config
    from samft.data.check import check_data

    cfg = load_config(config, overrides)
    report = check_data(cfg, "quick" if quick else "full", show_progress=not as_json)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"data check: {_e(config)}")
        for column in ("split", "pairs", "image sizes", "mask values: share of all pixels",
                       "foreground: mean share per image", "problems"):
            table.add_column(column)
        for split in report.splits:
            d = split.as_dict()
            fg = f"{d['foreground_mean']:.1%}" if d["foreground_mean"] is not None else "-"
            table.add_row(_e(split.name), str(split.pairs), _e(d["image_sizes"]), _e(d["mask_values"]), fg,
                          str(len(split.problems)))
        Console().print(table)
        for note in report.notes:
            _console().print(f"note: {note}", markup=False)
        for w in report.warnings:
            _console().print(f"[yellow]warning:[/] {_e(w)}")
        from samft.data.check import group_problems

        for p in group_problems(report.problems):
            _console().print(f"[red]problem:[/] {_e(p)}")
    if report.problems:
        raise SamftError(f"{len(report.problems)} problem(s) found")
    if not as_json:
        _console().print("[green]data check passed[/]")


config_app = typer.Typer(no_args_is_help=True, help="The config's keys and a config as a run would hold it.")
app.add_typer(config_app, name="config")


@config_app.command("keys")
@user_errors
def config_keys(
    section: Optional[str] = typer.Argument(None, help="a section (train, peft.lora, ...) or one key; default: all"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list"),
) -> None:
    """Every config key with its type, default and one line of help."""
    from samft.config import config_keys as keys

    rows = keys(section)
    if as_json:
        print(json.dumps([r._asdict() for r in rows], indent=2))
        return
    lines = [("key", "type", "default", "help")] + [
        (r.key, r.type, r.default, r.help + (" (--resume may change it)" if r.resumable else "")) for r in rows]
    width = [max(len(line[i]) for line in lines) for i in range(3)]
    for line in lines:
        print("  ".join(f"{v:<{w}}" for v, w in zip(line, width)) + f"  {line[3]}")


@config_app.command("show")
@user_errors
def config_show(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file"),
    every_method: bool = typer.Option(False, "--all", help="every PEFT method's section, not only the active one"),
) -> None:
    """The resolved config as YAML (protocol applied, overrides set, defaults filled in, paths made absolute):
    what a run's config.yaml would hold."""
    from samft.config import resolved_yaml

    print(resolved_yaml(config, overrides, every_method), end="")


@app.command()
@user_errors
def report(
    runs: List[Path] = typer.Argument(..., help="run directories (several: side by side)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="the HTML file (default: RUN/report.html for one "
                                       "run, report.html here for several)"),
    k: int = typer.Option(4, "--k", help="the worst and best K images of each set"),
    no_predict: bool = typer.Option(False, "--no-predict", help="do not run the models: only what the run's files "
                                    "hold (no precision-recall, confusion matrix or example images)"),
    data: Optional[List[str]] = typer.Option(None, "--data", help="NAME=PATH of a set evaluated with samft eval "
                                             "--data; repeatable"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing file samft did not write"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars"),
) -> None:
    """One self-contained HTML page per run, or several runs side by side: config, curves, metrics, errors."""
    from samft.report import write_report

    named = {k_: str(Path(v).expanduser().resolve()) for k_, v in _parse_named(data, "--data").items()}
    path = write_report(runs, out, overwrite=overwrite, k=k, predict=not no_predict, device=device, data=named,
                        show_progress=not no_progress)
    _console().print(f"written: {path}", markup=False)


@app.command("demo-data")
@user_errors
def demo_data(
    out_dir: Path = typer.Argument(..., help="folder to create (images/ and masks/)"),
    n: int = typer.Option(64, "--n", min=2, help="number of image/mask pairs"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing files of the same names in OUT"),
) -> None:
    """Write a synthetic binary-segmentation dataset for a first run."""
    from samft.data.synthetic import write_dataset

    write_dataset(out_dir, n, seed, overwrite=overwrite)
    _console().print(f"wrote {n} pairs to {out_dir}/images and {out_dir}/masks", markup=False)


LONG_COMMANDS = {"train", "eval", "predict", "prune", "report"}  # the commands that compute long


def _cpu_times() -> tuple[int, int]:
    """(all, idle) CPU time of the machine so far, in clock ticks, from /proc/stat's first line (Linux)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(fields), fields[3] + fields[4]


def cores_in_use(window: float = 0.2) -> tuple[float, str]:
    """How many cores other processes use now, and how it was measured.

    /proc/stat sampled over ``window`` seconds while this process sleeps: what runs now. The 1-minute load
    average (elsewhere, or when /proc/stat cannot be read) lags: right after an install or another command
    it still counts that finished work, and the quick start's training, started after its own install,
    ran 1.9x slower with sleeping OpenMP threads on an idle machine."""
    cores = os.cpu_count() or 1
    try:
        all0, idle0 = _cpu_times()
        time.sleep(window)
        all1, idle1 = _cpu_times()
        if all1 > all0:
            return cores * (1 - (idle1 - idle0) / (all1 - all0)), "now"
    except (OSError, ValueError, IndexError):
        pass
    return _load_average()


def _load_average() -> tuple[float, str]:
    """The 1-minute load average (costs nothing, but lags: see :func:`cores_in_use`)."""
    try:
        return os.getloadavg()[0], "1-minute load"
    except OSError:
        return 0.0, "unknown"


def quiet_openmp() -> None:
    """Keep OpenMP's waiting threads from stealing cores on a busy machine (unless the user chose a policy).

    Waiting OpenMP threads spin by default; beside one other training on 2 cores that made a short run
    48x slower (``scripts/bench_threads.py``, docs/performance.md). When other processes use at least half
    the cores as a long command starts (:func:`cores_in_use`, sampled for 0.2 s; the other commands read the
    1-minute load, which costs nothing) they sleep (``OMP_WAIT_POLICY=PASSIVE``: 0.04x the time beside a
    competitor, but 1.4-1.9x on an idle machine); otherwise they spin briefly (``GOMP_SPINCOUNT=10000``: as
    fast as the default when idle, 10x better than it if load arrives later). Set before torch loads.
    """
    if "torch" in sys.modules or any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        return
    cores = os.cpu_count() or 1
    long_command = bool(set(sys.argv[1:2]) & LONG_COMMANDS) and not {"--help", "-h"} & set(sys.argv[2:])
    used, how = cores_in_use() if long_command else _load_average()
    if used >= 0.5 * cores:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        if long_command:
            print(f"note: the machine is busy ({used:.1f} of {cores} cores in use, {how}): idle OpenMP threads "
                  f"will sleep (OMP_WAIT_POLICY=PASSIVE; set it yourself to choose)", file=sys.stderr)
    else:
        os.environ["GOMP_SPINCOUNT"] = "10000"


def main() -> None:
    quiet_openmp()
    try:
        app()
    except SystemExit:
        raise
    except SamftError as e:  # raised outside a command body (should not happen, but never show a traceback)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
