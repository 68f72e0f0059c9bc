"""scripts/compare_methods.py: the aggregation, and the real script end to end on a tiny SAM."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TINY, load_script


def _script():
    return load_script("compare_methods")


def test_mean_and_standard_error():
    cm = _script()
    mean, se = cm.mean_se([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and se == pytest.approx(0.2 / math.sqrt(3))
    assert cm.mean_se([0.4])[0] == 0.4 and math.isnan(cm.mean_se([0.4])[1])
    assert cm._fmt(0.7, 0.11547) == "0.7000 ± 0.1155" and cm._fmt(0.4, math.nan) == "0.4000"


def test_summary_table():
    cm = _script()
    runs = [{"method": m, "seed": s, "sets": {"val": {"dice@0.5": d}}, "n_images": {"val": 6},
             "trainable_params": p, "adapter_params": p - 100, "step_seconds_median": 0.1 * (s + 1),
             "cpu_seconds_per_step": 0.2,
             "peak_mib": 500.0 + s, "peak_kind": "CPU peak RSS"}
            for m, p, ds in (("lora", 150, (0.8, 0.6)), ("decoder_only", 100, (0.5, 0.5)))
            for s, d in enumerate(ds)]
    summary = cm.summarise(runs, ["lora", "decoder_only"], ["dice@0.5"])
    text = cm.markdown(summary, ["dice@0.5"], "header")
    assert "| `lora` | 0.7000 ± 0.1000 | 150 | 50 | 150 ± 50 | 200 ± 0 | 501 |" in text
    assert "| `decoder_only` | 0.5000 ± 0.0000 | 100 | 0 | 150 ± 50 | 200 ± 0 | 501 |" in text
    assert "### Test set `val` (6 images, 2 seed(s) per method)" in text


def test_compare_methods_end_to_end(synthetic_dir, tmp_path, monkeypatch, capsys):
    config = {"model": TINY, "peft": {"method": "lora"},
              "data": {"root": str(synthetic_dir), "train": ".", "val_fraction": 0.25, "num_workers": 0},
              "train": {"epochs": 1, "batch_size": 6, "device": "cpu"}, "eval": {"batch_size": 6}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    cm = _script()
    args = ["--config", "c.yaml", "--methods", "decoder_only,lora", "--seeds", "3", "--out", "docs/cmp.md",
            "--workdir", "runs/cmp", "train.lr=1e-3"]
    assert cm.main([*args, "--in-process"]) == 0
    assert "decoder_only seed 3 ->" in capsys.readouterr().out
    table = (tmp_path / "docs" / "cmp.md").read_text()
    assert table.startswith("Command: `python scripts/compare_methods.py --config c.yaml --methods decoder_only,lora")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`decoder_only`", "`lora`"]
    assert (tmp_path / "docs" / "cmp.png").stat().st_size > 1000
    raw = json.loads((tmp_path / "docs" / "cmp.json").read_text())
    assert [(r["method"], r["seed"], r["n_images"]["val"]) for r in raw] == [("decoder_only", 3, 6), ("lora", 3, 6)]
    assert raw[1]["request"]["overrides"] == ["train.lr=1e-3", "peft.method=lora", "train.seed=3"]
    assert raw[0]["adapter_params"] == 0 and raw[1]["adapter_params"] > 0 and raw[1]["steps"] == 3
    assert all(r["cpu_seconds_per_step"] > 0 and r["step_seconds_median"] > 0 for r in raw)
    page = (tmp_path / "docs" / "cmp.html").read_text()  # samft report of the runs, side by side
    for label in ("decoder_only/seed3", "lora/seed3"):
        assert f'data-run="{label}"' in page

    with open(tmp_path / "docs" / "cmp.md", "a") as f:
        f.write(f"{cm.NOTES_MARKER}\nmy notes\n")
    assert cm.main(args) == 0 and " -> " not in capsys.readouterr().out  # finished runs are reused, not retrained
    regenerated = (tmp_path / "docs" / "cmp.md").read_text()
    assert regenerated.startswith("Command:") and regenerated.endswith(f"{cm.NOTES_MARKER}\nmy notes\n")
    assert regenerated.count("| `lora` |") == 1
    assert cm.main([*args[:3], "decoder_only,loraa", *args[4:]]) == 2
    assert "unknown PEFT method 'loraa' (did you mean 'lora'?)" in capsys.readouterr().err

    # the default mode runs each (method, seed) as `compare_methods.py ARGS --run-one METHOD SEED` in its own
    # process, so that the peak memory is the run's own
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAMFT_CACHE": str(tmp_path / ".cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_methods.py"), *args, "--run-one", "lora",
                           "3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "runs" / "cmp" / "lora" / "seed3" / "result.json").read_text())
    assert result["peak_kind"] == "CPU peak RSS" and result["peak_mib"] > 100
    assert result["trainable_params"] == raw[1]["trainable_params"]


def test_sigterm_stops_the_child_training(tmp_path):
    """compare_methods killed by SIGTERM leaves no child running (run_child forwards the stop)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = (f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import compare_methods as c; "
              f"c.run_child([sys.executable, '-c', {child!r}], {{}})")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    for _ in range(600):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    time.sleep(0.2)
    try:
        os.kill(child_pid, 0)
        alive = open(f"/proc/{child_pid}/stat").read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive, "the child training was left running"


def test_method_entries_name_choices_hf_types_and_placements():
    cm = _script()
    assert cm.choice_overrides("lora") == ["peft.method=lora"]
    assert cm.choice_overrides("lora@late:1") == ["peft.method=lora", "peft.blocks=late:1"]
    assert cm.choice_overrides("dora") == ["peft.method=lora", "peft.lora.variant=dora"]
    assert cm.choice_overrides("hf:loha@late:2") == ["peft.method=hf", "peft.hf.type=loha", "peft.blocks=late:2"]
    assert cm.run_name("hf:loha") == "hf-loha"
    from samft.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'conv_lora'"):
        cm.choice_overrides("conv-lora")


def test_a_bad_entry_fails_before_any_run(tmp_path, capsys):
    config = {"model": TINY, "peft": {"method": "lora"}, "train": {"device": "cpu"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cm = _script()
    assert cm.main(["--config", str(tmp_path / "c.yaml"), "--methods", "lora,hf:vera", "--seeds", "0",
                    "--workdir", str(tmp_path / "runs")]) == 2
    assert "peft.hf.type" in capsys.readouterr().err and not (tmp_path / "runs").exists()
