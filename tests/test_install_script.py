"""scripts/_install.py (the install of scripts/_env.sh with both cores): the same packages as one pip, recorded as
one pip records them, and a clear failure (so _env.sh falls back) when pip cannot resolve.

A throwaway venv and two hand-made wheels on a local folder (``--no-index``, no pip configuration): no download."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import _install  # noqa: E402

PROJECT_TOML = """[build-system]
requires = []
build-backend = "toy_backend"
backend-path = ["."]

[project]
name = "toyproj"
version = "0.1"
dynamic = ["dependencies", "optional-dependencies"]
"""

# An in-tree PEP 517/660 backend (no setuptools or wheel to fetch): the editable wheel puts the project on sys.path.
BACKEND = """import base64, hashlib, os, zipfile

DIST = "toyproj-0.1.dist-info"
META = ("Metadata-Version: 2.1\\nName: toyproj\\nVersion: 0.1\\nRequires-Dist: toy-big\\nProvides-Extra: extra\\n"
        "Requires-Dist: toy-small; extra == 'extra'\\n")


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(folder, config_settings=None):
    os.makedirs(os.path.join(folder, DIST))
    with open(os.path.join(folder, DIST, "METADATA"), "w") as f:
        f.write(META)
    return DIST


def build_wheel(folder, config_settings=None, metadata_directory=None):
    files = {"toyproj.pth": os.path.abspath(".") + "\\n", DIST + "/METADATA": META,
             DIST + "/WHEEL": "Wheel-Version: 1.0\\nGenerator: toy\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    name = "toyproj-0.1-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(folder, name), "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(DIST + "/RECORD", "\\n".join(record + [DIST + "/RECORD,,"]) + "\\n")
    return name


get_requires_for_build_editable = get_requires_for_build_wheel
prepare_metadata_for_build_editable = prepare_metadata_for_build_wheel
build_editable = build_wheel
"""


def _wheel(folder: Path, name: str, version: str, requires: list[str], payload: int) -> Path:
    """A pure-Python wheel of module ``name`` (underscored) holding ``payload`` bytes."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\nDATA = {'x' * payload!r}\n".encode(),
        f"{dist}/METADATA": ("Metadata-Version: 2.1\nName: " + name + "\nVersion: " + version + "\n"
                             + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()] + [f"{dist}/RECORD,,"]
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name_in, data in files.items():
            z.writestr(name_in, data)
        z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(venv python, project, constraints, wheel folder, env): toyproj needs toy-big, which needs toy-dep; its
    extra needs toy-small; an older toy-dep lies beside the pinned one."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    wheels.mkdir()
    _wheel(wheels, "toy-big", "1.0", ["toy-dep>=1"], 200_000)
    _wheel(wheels, "toy-dep", "2.0", [], 10)
    _wheel(wheels, "toy-dep", "1.0", [], 10)
    _wheel(wheels, "toy-small", "3.0", [], 10)
    project = tmp / "toyproj"
    (project / "toyproj").mkdir(parents=True)
    (project / "toyproj" / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text(PROJECT_TOML)
    (project / "toy_backend.py").write_text(BACKEND)
    constraints = tmp / "constraints.txt"
    constraints.write_text("# pins\ntoy-big==1.0\ntoy_dep==2.0\ntoy-small==3.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip.conf adds indexes and a constraint file
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=120)
    return tmp / "venv" / "bin" / "python", project, constraints, wheels, env


def _install_toy(toy, extras: str, constraints: Path | None = None) -> subprocess.CompletedProcess:
    python, project, pins, wheels, env = toy
    return subprocess.run([str(python), str(ROOT / "scripts" / "_install.py"), str(project), str(constraints or pins),
                           extras, "--no-compile", "--head", "toy-big", "--", "--no-index", "--find-links",
                           str(wheels)], capture_output=True, text=True, env=env, timeout=300)


def _freeze(toy) -> list[str]:
    python, _, _, _, env = toy
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
                         capture_output=True, text=True, env=env, check=True).stdout
    return sorted(line for line in out.splitlines() if line.startswith("toy"))


def test_installs_what_pip_resolves_recorded_as_pip_records_it_then_only_what_is_missing(toy):
    python, _, _, _, env = toy
    out = _install_toy(toy, "")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "installed 3 packages" in out.stdout, out.stdout
    # name==version as one pip writes it (a URL install would freeze as 'toy-big @ file:///...')
    assert _freeze(toy) == ["toy-big==1.0", "toy-dep==2.0"]
    imported = subprocess.run([str(python), "-c", "import toyproj, toy_big, toy_dep; print(toy_dep.VERSION)"],
                              capture_output=True, text=True, env=env, cwd="/")
    assert imported.stdout.strip() == "2.0", imported.stderr
    # again with the extra: the pinned packages already there are kept, the extra's package added
    out = _install_toy(toy, "extra")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 wheels unpacked" in out.stdout, out.stdout
    assert _freeze(toy) == ["toy-big==1.0", "toy-dep==2.0", "toy-small==3.0"]


def test_an_unresolvable_pin_fails_with_pips_message_so_the_plain_install_runs(toy, tmp_path):
    bad = tmp_path / "constraints.txt"
    bad.write_text("toy-big==1.0\ntoy-dep==9.9\n")
    out = _install_toy(toy, "", bad)
    assert out.returncode != 0
    assert "ResolutionImpossible" in out.stderr  # the plain install that _env.sh runs then explains the conflict


def test_groups_balance_bytes_and_a_cost_per_package(tmp_path):
    def item(name: str, size: int) -> dict:
        path = tmp_path / f"{name}-1.0-py3-none-any.whl"
        path.write_bytes(b"x" * size)
        return {"download_info": {"url": path.as_uri()}}

    big = item("big", 64 << 20)
    small = [item(f"s{n}", 10) for n in range(6)]
    groups = _install.split_by_cost([*small, big])
    # 64 MB + the cost of one package = five small packages' cost: it shares its group with one small wheel
    assert sorted(len(g) for g in groups) == [2, 5] and any(big in g and len(g) == 2 for g in groups)
    remote = [{"download_info": {"url": f"https://example.invalid/p{n}.whl"}} for n in range(6)]
    assert sorted(len(g) for g in _install.split_by_cost(remote)) == [3, 3]  # sizes unknown: by count


def test_pins_are_read_from_the_constraints_file_by_canonical_name(tmp_path):
    pins = tmp_path / "c.txt"
    pins.write_text("# torch==0\nfoo-bar==1.2  \nTorch == 2.14.1\nother>=1\n")
    assert _install.pinned(pins, "torch") == "Torch==2.14.1"
    assert _install.pinned(pins, "Foo_Bar") == "foo-bar==1.2"
    assert _install.pinned(pins, "other") is None  # a range is no pin


def test_links_page_lists_each_file_with_its_hash(tmp_path):
    items = [{"download_info": {"url": "file:///w/a%20b-1.0-py3-none-any.whl",
                                "archive_info": {"hashes": {"sha256": "ab" * 32}}},
              "metadata": {"name": "a-b", "version": "1.0"}}]
    page = _install.links_page(items, tmp_path / "links.html").read_text()
    assert f'href="file:///w/a%20b-1.0-py3-none-any.whl#sha256={"ab" * 32}"' in page
    assert _install.pins(items) == ["a-b==1.0"]
