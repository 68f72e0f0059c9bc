# Sourced by demo.sh and test.sh: create .venv if missing and install samft with the pinned constraints.
# SAMFT_EXTRAS names the extras to install (test.sh: "test,all", every optional part, as the tests cover them;
# demo.sh: none, the quick start needs only the core). Re-installs only when pyproject.toml or constraints.txt
# changed, or when the extras asked for were not installed yet (an install of "test,all" serves every caller).
# Set SAMFT_VENV to use another folder.
# editable_mode=compat puts the clone on sys.path (a .pth file): from the clone's parent folder, `import samft`
# then finds the package, not the clone folder as a namespace package.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAMFT_VENV:-$ROOT/.venv}"
EXTRAS="${SAMFT_EXTRAS-test,all}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1) $ROOT"
_samft_installed() { [ -f "$VENV/.samft-installed-$1" ] && [ "$(cat "$VENV/.samft-installed-$1")" = "$WANT" ]; }
if ! _samft_installed "$EXTRAS" && ! _samft_installed "test,all"; then
  echo "installing samft${EXTRAS:+[$EXTRAS]} and its pinned dependencies into $VENV (about a minute the first time)"
  # The core install (the quick start) skips pip's byte-compilation of every installed module (39 of 111 s,
  # torch's thousands of modules mostly) and byte-compiles what samft imports instead (scripts/_precompile.py,
  # ~10 s). The full install for the tests keeps pip's: they import far more (the optional parts, torch's).
  COMPILE=""
  [ -z "$EXTRAS" ] && COMPILE="--no-compile"
  # SAM2_BUILD_CUDA=0: the sam2 extra builds without its CUDA extension (a CPU machine has no nvcc).
  # scripts/_install.py installs what pip resolves with both cores (core 49 -> ~40 s, [test,all] 140 -> 78 s); should it fail,
  # the plain install below completes whatever it left.
  _samft_plain_install() {
    echo "note: the install with both cores failed (its output: $VENV/pip-install.log); installing with one pip"
    SAM2_BUILD_CUDA=0 "$VENV/bin/python" -m pip install $COMPILE --disable-pip-version-check -c "$ROOT/constraints.txt" \
      --config-settings editable_mode=compat -e "$ROOT${EXTRAS:+[$EXTRAS]}" >>"$VENV/pip-install.log" 2>&1
  }
  if ! SAM2_BUILD_CUDA=0 "$VENV/bin/python" "$ROOT/scripts/_install.py" "$ROOT" "$ROOT/constraints.txt" "$EXTRAS" $COMPILE \
       >"$VENV/pip-install.log" 2>&1 && ! _samft_plain_install; then
    grep -v "is ignored: it is neither a file nor a directory" "$VENV/pip-install.log" | tail -40
    echo "install failed; full log: $VENV/pip-install.log" >&2
    exit 1
  fi
  if [ -n "$COMPILE" ]; then
    # SAMFT_PRECOMPILE=background (demo.sh): run it beside the caller's next step; the caller waits for
    # $SAMFT_PRECOMPILE_PID before the commands that import torch
    if [ "${SAMFT_PRECOMPILE-}" = background ]; then
      env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" "$ROOT/scripts/_precompile.py" &
      SAMFT_PRECOMPILE_PID=$!
    elif ! env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" "$ROOT/scripts/_precompile.py"; then
      echo "byte-compiling samft's imports failed (see above); the install itself is complete" >&2
    fi
  fi
  echo "$WANT" >"$VENV/.samft-installed-$EXTRAS"
fi
export PATH="$VENV/bin:$PATH"
