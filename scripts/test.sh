#!/usr/bin/env bash
# Install (as demo.sh does) and run the whole test suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
python -m pytest -q "$@"
