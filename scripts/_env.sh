# Sourced by demo.sh and test.sh: create .venv if missing and install samft with the pinned constraints.
# Re-installs only when pyproject.toml or constraints.txt changed. Set SAMFT_VENV to use another folder.
# editable_mode=compat puts the clone on sys.path (a .pth file): from the clone's parent folder, `import samft`
# then finds the package, not the clone folder as a namespace package.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAMFT_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
STAMP="$VENV/.samft-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1) $ROOT"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "installing samft and its pinned dependencies into $VENV (about a minute the first time)"
  if ! SAM2_BUILD_CUDA=0 "$VENV/bin/python" -m pip install --disable-pip-version-check -c "$ROOT/constraints.txt" \
       --config-settings editable_mode=compat -e "$ROOT[test,all]" >"$VENV/pip-install.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$VENV/pip-install.log" | tail -40
    echo "install failed; full log: $VENV/pip-install.log" >&2
    exit 1
  fi
  echo "$WANT" >"$STAMP"
fi
export PATH="$VENV/bin:$PATH"
