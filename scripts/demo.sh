#!/usr/bin/env bash
# Quick start on a CPU, no downloads: install, make the synthetic demo data, then
# train Conv-LoRA on a tiny SAM (configs/demo.yaml) -> evaluate -> predict.
set -euo pipefail
cd "$(dirname "$0")/.."
SAMFT_PRECOMPILE=background SAMFT_EXTRAS="${SAMFT_EXTRAS-}" source scripts/_env.sh   # the core only
samft demo-data runs/demo-data --n 512 --overwrite   # the demo's own files: a rerun replaces them
if [ -n "${SAMFT_PRECOMPILE_PID-}" ] && ! wait "$SAMFT_PRECOMPILE_PID"; then  # a first install byte-compiles meanwhile
  echo "byte-compiling samft's imports failed (see above); the demo goes on without it" >&2
fi
samft train --config configs/demo.yaml output.overwrite=true "$@"
samft eval --run runs/demo
samft predict 'runs/demo-data/images/00[0-1]?.png' --run runs/demo --out runs/demo/predictions --overlay --overwrite
echo "demo finished: run in runs/demo, masks in runs/demo/predictions, overlays in runs/demo/predictions/overlays"
