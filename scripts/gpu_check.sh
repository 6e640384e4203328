#!/usr/bin/env bash
# The whole GPU check in one command, under 8 minutes on an H100:
#
#   bash scripts/gpu_check.sh OUT          # on the GPU machine
#   bash scripts/gpu_check.sh OUT --dry    # (or DRY=1) every step on a CPU, tiny shapes
#
# 1. installs the project's dependencies that the machine lacks, offline, from WHEELS (default
#    .wheels/py312: an ignored copy of the Python 3.12 wheel folder, see the README) into .site;
# 2. runs scripts/gpu_check.py's parts, each under its own time budget: the Pallas SSD tests
#    compiled on the card, the card's ceilings, SSD speed ("xla", "pallas", mamba_ssm's Triton
#    SSD from the ignored .peer/ folder, see scripts/prepare_peers.sh), the paper config's train
#    step, bsmamba2-separate on a 4-minute track, and BSMamba2 vs BS-RoFormer forwards.
# Everything lands in OUT: a log per part, JSON, OUT/parts.json and OUT/summary.md (the tables).
# Exit status 0 when every step passed. Knobs: PYTHON (python3), WHEELS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUT [--dry]}
shift
DRY=${DRY:-}
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=1 ;;
    *) echo "unknown argument $arg (usage: bash scripts/gpu_check.sh OUT [--dry])" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.wheels/py312}
export PYTHONUNBUFFERED=1

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target .site --upgrade \
      "$WHEELS"/*.whl 2>&1 | tee "$OUT/install.log" \
      || echo "warning: offline install from $WHEELS failed (see $OUT/install.log)" >&2
    export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "wheels in $WHEELS are for Python 3.12; $("$PY" -V) uses its own packages" \
      | tee "$OUT/install.log"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

"$PY" scripts/gpu_check.py run "$OUT" ${DRY:+--dry}
