"""Install samft and its pinned dependencies with both cores busy (``scripts/_env.sh``).

A plain ``pip install -c constraints.txt -e .`` resolves (parsing the package indexes: ~19 s here), then
unpacks every wheel in turn on one core (~30 s for the core install, most of it torch's CUDA build and its
``nvidia-*`` libraries). This does the same install in three steps, pip's own resolution deciding every file:

1. pip resolves in a dry run (``--report``) while a second pip installs the pinned torch (the largest wheel);
2. the wheels of the report not yet installed at the reported version are installed by two pips side by side,
   split by size plus a cost per package, each ``--no-deps --no-index`` as ``name==version`` from a links page
   of exactly the reported files with their sha256 (:func:`links_page`);
3. the rest (source distributions, built as pip builds them) and samft itself (editable), ``--no-deps``; then
   ``pip check``.

Any failure exits non-zero and ``_env.sh`` runs the plain install, which completes whatever is missing.

    .venv/bin/python scripts/_install.py ROOT CONSTRAINTS [EXTRAS] [--no-compile] [--head torch] [-- PIP OPTIONS]
"""

from __future__ import annotations

import argparse
import html
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]


def _run_all(commands: list[list[str]]) -> bool:
    """Run the commands side by side; True if every one succeeded."""
    procs = [subprocess.Popen(c) for c in commands]
    return all([p.wait() == 0 for p in procs])


def pinned(constraints: Path, name: str) -> str | None:
    """``name==version`` as the constraints file pins it (None if it does not)."""
    wanted = canonical(name)
    for line in constraints.read_text().splitlines():
        found = re.match(r"\s*([A-Za-z0-9._-]+)\s*==\s*([^\s;#]+)\s*$", line)
        if found and canonical(found.group(1)) == wanted:
            return f"{found.group(1)}=={found.group(2)}"
    return None


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def file_size(url: str) -> int:
    """Bytes of a local wheel (``file://``); 1 for one pip would download (its size is not known here)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        try:
            return os.path.getsize(unquote(parsed.path))
        except OSError:
            return 1
    return 1


def with_hash(item: dict) -> str:
    """The report's URL with its hash as a fragment, so the installing pip checks it."""
    info = item["download_info"]
    hashes = info.get("archive_info", {}).get("hashes") or {}
    name, digest = next(iter(sorted(hashes.items())), (None, None))
    return f"{info['url']}#{name}={digest}" if digest else info["url"]


def links_page(items: list[dict], path: Path) -> Path:
    """A ``--find-links`` page of exactly the resolved files. Installing ``name==version`` from it (not the URL
    itself) records the packages as an index install does: ``pip freeze`` prints ``name==version``, not a URL."""
    rows = [f'<a href="{html.escape(with_hash(i))}">{html.escape(Path(urlparse(i["download_info"]["url"]).path).name)}'
            f'</a>' for i in items]
    path.write_text("<!DOCTYPE html><html><body>\n" + "\n".join(rows) + "\n</body></html>\n")
    return path


def pins(items: list[dict]) -> list[str]:
    return [f'{i["metadata"]["name"]}=={i["metadata"]["version"]}' for i in items]


PER_PACKAGE = 16 << 20


def cost(item: dict) -> int:
    """The time one wheel takes pip, in bytes: its size and a fixed cost per package (finding, checking and
    recording it: about as long as unpacking 8-32 MB here)."""
    return file_size(item["download_info"]["url"]) + PER_PACKAGE


def split_by_cost(items: list[dict], parts: int = 2) -> list[list[dict]]:
    """Greedy, costliest first: ``parts`` groups of about the same :func:`cost`."""
    groups: list[list[dict]] = [[] for _ in range(parts)]
    sizes = [0] * parts
    for item in sorted(items, key=lambda i: -cost(i)):
        k = sizes.index(min(sizes))
        groups[k].append(item)
        sizes[k] += cost(item)
    return [g for g in groups if g]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the project to install, editable")
    ap.add_argument("constraints", type=Path)
    ap.add_argument("extras", nargs="?", default="", help="its extras, comma-separated")
    ap.add_argument("--no-compile", action="store_true", help="pip's --no-compile")
    ap.add_argument("--head", default="torch", help="the pinned package installed beside the resolution")
    split = argv.index("--") if "--" in argv else len(argv)
    args, options = ap.parse_args(argv[:split]), argv[split + 1:]  # after --: options for every pip
    root, constraints, extras = args.root, args.constraints, args.extras
    compile_flags = ["--no-compile"] if args.no_compile else []
    target = f"{root}[{extras}]" if extras else str(root)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        resolve = _pip("--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "-c", str(constraints),
                       *options, "-e", target)
        first = pinned(constraints, args.head)
        head = [_pip(*compile_flags, "--no-deps", *options, first)] if first else []
        if not _run_all([resolve, *head]):
            return 1
        items = json.loads(report.read_text())["install"]
        resolved = time.perf_counter() - t0
        importlib.invalidate_caches()
        todo = [i for i in items if not i["download_info"].get("dir_info", {}).get("editable")
                and installed_version(i["metadata"]["name"]) != i["metadata"]["version"]]
        links = ["--no-deps", "--find-links", links_page(todo, Path(tmp) / "links.html").as_uri()]
        wheels = [i for i in todo if urlparse(i["download_info"]["url"]).path.endswith(".whl")]
        others = [i for i in todo if i not in wheels]
        groups = split_by_cost(wheels)
        if groups and not _run_all([_pip(*compile_flags, *links, "--no-index", *options, *pins(g)) for g in groups]):
            return 1
        unpacked = time.perf_counter() - t0
        # the index stays on for the build requirements of samft and of source distributions
        last = _pip(*compile_flags, *links, *options, *pins(others), "--config-settings", "editable_mode=compat",
                    "-e", target)
        if subprocess.call(last) != 0 or subprocess.call([sys.executable, "-m", "pip", "check"]) != 0:
            return 1
    print(f"installed {len(items)} packages in {time.perf_counter() - t0:.0f} s (resolved in {resolved:.0f} s "
          f"beside {first or 'nothing'}; {len(wheels)} wheels unpacked by {len(groups)} pips side by side by "
          f"{unpacked:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
