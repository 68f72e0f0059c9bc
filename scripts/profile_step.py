"""Where one demo training step spends its CPU time: torch's profiler over ``--steps`` steps of the demo config
(configs/demo.yaml: tiny SAM, 192 px, batch 8, Conv-LoRA; one thread), the top ops by self CPU time.

    python scripts/profile_step.py [--steps 10] [--top 12] [--threads 1] [--write]

``--write`` replaces the table in docs/performance.md (between the ``profile-step`` markers), so the next
regression shows in a diff. Shares are of the profiled CPU time of the steps (warm-up excluded).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "performance.md"
BEGIN, END = "<!-- profile-step:begin -->", "<!-- profile-step:end -->"


def profile(steps: int, top: int) -> tuple[list[tuple[str, float, int]], float]:
    """(name, self CPU ms per step, calls per step) of the ``top`` ops, and the total self CPU ms per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sys.path.insert(0, str(HERE))
    from _demo_step import demo_step

    run_step, _ = demo_step(total_steps=steps + 3)
    for _ in range(3):  # warm-up
        run_step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run_step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1000 / steps
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [(e.key, e.self_cpu_time_total / 1000 / steps, e.count // steps) for e in events[:top]]
    return rows, total


def table(rows: list[tuple[str, float, int]], total: float, steps: int, threads: int) -> str:
    lines = [f"One demo training step, {steps} profiled steps, {threads} thread(s), torch {torch.__version__}, "
             f"{platform.machine()}: **{total:.1f} ms self CPU time per step**.", "",
             "| op | self CPU ms / step | share | calls / step |", "|---|---:|---:|---:|"]
    lines += [f"| `{name}` | {ms:.2f} | {100 * ms / total:.1f} % | {calls} |" for name, ms, calls in rows]
    return "\n".join(lines)


def write(text: str) -> None:
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC}: the markers {BEGIN} and {END} are missing")
    head, rest = doc.split(BEGIN, 1)
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote the table into {DOC}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="replace the table in docs/performance.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, total = profile(args.steps, args.top)
    text = table(rows, total, args.steps, args.threads)
    print(text)
    if args.write:
        write(text)


if __name__ == "__main__":
    main()
