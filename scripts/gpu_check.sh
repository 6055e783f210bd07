#!/usr/bin/env bash
# The one-shot GPU check on an offline GPU machine (docs/benchmarks.md, "GPU"):
#   scripts/gpu_check.sh OUT [--budget SECONDS] [--rehearse]
# Wheels the machine lacks (scripts/gpu-machine-wheels.txt, fetched into .whl/ where pip has
# a network) are installed into a private folder first; then scripts/gpu_check.py runs every
# step and writes OUT/gpu-check.json and OUT/gpu-check.md after each one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  site=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
  "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} HF_HUB_OFFLINE=1
exec "$PYTHON" scripts/gpu_check.py "$@"
