"""The overview table (one column per run) and each run's details: its config, where it came from (resumes),
a pruned encoder's blocks and GMACs, BRA's attention settings. Values are plain text; the template escapes them."""

from __future__ import annotations

import time
from typing import Any

from samft.report.runinfo import Part, RunInfo, progress_done, split_sizes, step_seconds


def _na(part: Part) -> str:
    return f"not available: {part.missing}"


def _params(info: RunInfo) -> str:
    if not info.model.ok:
        return _na(info.model)
    d = info.model.value
    return (f"{d['trainable_params']:,} of {d['total_params']:,} ({d['trainable_percent']:g} %): adapters "
            f"{d['adapter_params']:,} + decoder {d['decoder_params']:,}")


def _method(info: RunInfo) -> str:
    cfg = info.cfg
    options = ", ".join(f"{k}={v}" for k, v in vars(cfg.method_cfg).items())
    return f"{cfg.peft.method} ({options})" if options else cfg.peft.method


def _task(info: RunInfo) -> str:
    classes = info.cfg.data.classes
    if not classes:
        return f"binary (threshold {info.cfg.eval.threshold:g})"
    return f"multi-class, {len(classes)} classes: {', '.join(map(str, classes))}"


def _data(info: RunInfo) -> str:
    d = info.cfg.data
    tests = ", ".join(f"{k}={v}" for k, v in d.test.items()) if d.test else "none (the validation split is evaluated)"
    return f"{d.root} (format {d.format}, train {d.train}, val {d.val or f'{d.val_fraction:g} held out'}); test: {tests}"


def _split(info: RunInfo) -> str:
    if not info.split.ok:
        return _na(info.split)
    return ", ".join(f"{name} {n}" for name, n in split_sizes(info.split.value).items())


def _trained(info: RunInfo) -> str:
    parts = []
    if info.metrics.ok:
        done = progress_done(info.metrics.value)
        parts.append(f"{done['epochs'] or 0} of {info.cfg.train.epochs} epochs, {done['steps'] or 0} steps")
    else:
        parts.append(_na(info.metrics))
    if info.adapter_meta.ok and "metric" in info.adapter_meta.value:  # a validated training's adapter
        m = info.adapter_meta.value
        parts.append(f"best {m['metric']} {_g(m.get('best_value', '?'))} at epoch {m.get('epoch', '?')} "
                     f"(step {m.get('step', '?')})")
    elif info.adapter_meta.ok:  # e.g. samft prune without fine-tuning: the adapter as the search left it
        parts.append("the adapter records no validation (not chosen by a training's best metric)")
    return "; ".join(parts)


def _g(text: str) -> str:
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def _speed(info: RunInfo) -> str:
    if not info.metrics.ok:
        return _na(info.metrics)
    seconds = step_seconds(info.metrics.value)
    rates = sorted(float(r["images_per_s"]) for r in info.metrics.value if r["kind"] == "step" and r.get("images_per_s"))
    if seconds is None:
        return "not available: metrics.csv holds no timed step"
    rate = f", {rates[len(rates) // 2]:.3g} images/s" if rates else ""
    return f"{seconds:.4g} s per step (median over the logging windows){rate}; device {info.cfg.train.device}, " \
           f"precision {info.cfg.train.precision}"


def _origin(info: RunInfo) -> str:
    base = f"{info.cfg.model.type} ({info.cfg.model.checkpoint or 'random weights'})"
    if info.adapter_meta.ok:
        m = info.adapter_meta.value
        base += f"; base sha256 {m.get('base_sha256', '?')[:23]}; samft {m.get('samft_version', '?')}"
    if info.cfg.model.pruned:
        base += f"; pruned base {info.cfg.model.pruned}"
    resumes = f"resumed {len(info.resumes.value)} time(s) with a changed config" if info.resumes.ok \
        else info.resumes.missing
    return f"{base}; {resumes}"


def _model(info: RunInfo) -> str:
    cfg = info.cfg
    text = f"{cfg.model.type} at {cfg.model.img_size} px, attention {cfg.model.attention}"
    if info.model.ok and info.model.value.get("encoder_gmacs") is not None:
        text += f", encoder {info.model.value['encoder_gmacs']:g} GMACs per image"
    return text


def overview_rows(infos: list[RunInfo]) -> list[tuple[str, list[str]]]:
    """(row title, one cell per run)."""
    rows = [("run directory", lambda i: str(i.path)), ("method", _method), ("model", _model),
            ("trainable parameters", _params), ("task", _task), ("data", _data), ("split (split.json)", _split),
            ("trained", _trained), ("time per step", _speed), ("came from", _origin),
            ("evaluated sets", lambda i: ", ".join(i.evaluation.value["sets"]) if i.evaluation.ok else _na(i.evaluation))]
    return [(title, [cell(i) for i in infos]) for title, cell in rows]


def run_details(info: RunInfo) -> dict[str, Any]:
    """One run's details for the template."""
    return {"label": info.label, "path": str(info.path), "config_yaml": info.config_yaml,
            "resumes": _resumes(info), "pruned": _pruned(info), "bra": _bra(info)}


def _resumes(info: RunInfo) -> dict[str, Any]:
    if not info.resumes.ok:
        return {"missing": info.resumes.missing, "entries": []}
    entries = [{"when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])), "at": e["at"],
                "changed": [(k, str(c.get("from")), str(c.get("to"))) for k, c in e["changed"].items()]}
               for e in info.resumes.value]
    return {"missing": "", "entries": entries}


def _pruned(info: RunInfo) -> dict[str, Any]:
    if not info.cfg.model.pruned and not info.architecture.ok:
        return {}
    out: dict[str, Any] = {"missing": "", "blocks": [], "summary": ""}
    if info.architecture.ok:
        a = info.architecture.value
        out["summary"] = (f"encoder GMACs: dense {a.get('dense_gmacs', 0):.4g}, target {a.get('target_gmacs', 0):.4g}, "
                          f"pruned {a.get('pruned_gmacs', 0):.4g}")
    else:
        out["missing"] = info.architecture.missing
    if info.model.ok and "pruned_blocks" in info.model.value:
        d = info.model.value
        out["summary"] = out["summary"] or f"encoder GMACs {d['encoder_gmacs_dense']:.4g} -> {d['encoder_gmacs']:.4g}"
        out["blocks"] = [{"block": b["block"], "attn": b["attn"], "mlp": f"{b['mlp_units']}/{b['mlp_units_dense']}",
                          "before": b["gmacs_before"], "after": b["gmacs_after"]} for b in d["pruned_blocks"]]
    elif not info.model.ok:
        out["missing"] = out["missing"] or info.model.missing
    return out


def _bra(info: RunInfo) -> dict[str, Any]:
    if info.cfg.model.attention != "bra":
        return {}
    settings = [(k, str(v)) for k, v in vars(info.cfg.model.bra).items()]
    if info.model.ok:
        d = info.model.value
        settings.append(("blocks by attention", ", ".join(f"{k} x {n}" for k, n in d["attention_blocks"].items())))
        settings += [(f"new parameters: {k}", f"{n:,}") for k, n in d.get("attention_params", {}).items()]
    return {"settings": settings}
