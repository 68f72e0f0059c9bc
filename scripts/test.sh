#!/usr/bin/env bash
# Install (as demo.sh does, plus the test tools and every optional part) and run the whole test suite on the CPU.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
# samft report's browser test opens the page in Debian's chromium; without it that test skips and says so.
# SAMFT_INSTALL_CHROMIUM=1 (.ci/run sets it) installs it first where apt-get may (root, Debian/Ubuntu).
if [ "${SAMFT_INSTALL_CHROMIUM:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian's chromium for the report's browser test"
  { apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; } \
    || echo "could not install chromium: the report's browser test will skip"
fi
# two worker processes, each test file kept in one (its module fixtures and order as written), one torch
# thread per worker (tests/conftest.py); SAMFT_TEST_WORKERS=0 runs in this process
python -m pytest -q -n "${SAMFT_TEST_WORKERS:-2}" --dist loadfile "$@"
