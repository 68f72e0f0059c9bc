#!/usr/bin/env bash
# Install (as demo.sh does) and run the whole test suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
# two worker processes, each test file kept in one (its module fixtures and order as written), one torch
# thread per worker (tests/conftest.py); SAMFT_TEST_WORKERS=0 runs in this process
python -m pytest -q -n "${SAMFT_TEST_WORKERS:-2}" --dist loadfile "$@"
