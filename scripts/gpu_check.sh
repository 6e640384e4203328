#!/usr/bin/env bash
# The SSD kernel check for a GPU machine, in one command:
#
#   bash scripts/gpu_check.sh [OUTDIR]        (default: $OUT, else gpu_check_out)
#
# 1. installs the dependencies that the machine lacks, offline, from WHEELS (default
#    .wheels/py312: an ignored copy of shared/wheels/py312) into .site;
# 2. runs the Pallas SSD tests on the GPU (compiled kernels, not the interpreter);
# 3. measures the card's copy bandwidth and bf16 matmul rate (benchmarks/roofline.py);
# 4. times "xla" against "pallas" at the BSMamba2 shapes and a length sweep, bf16 and fp32,
#    forward and forward+backward (benchmarks/ssd.py);
# 5. prints the table: ms, TB/s, TFLOP/s, their share of the measured ceilings, x memory floor.
# Logs and JSON land in OUTDIR. Exit status: the tests' (the benchmarks run either way).
# Knobs: PYTHON (python3), WHEELS, BENCH_ARGS (extra benchmarks/ssd.py flags, e.g. "--repeats 3").
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.wheels/py312}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target .site "$WHEELS"/*.whl \
    || echo "warning: offline install from $WHEELS failed" >&2
  export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

"$PY" - <<'PYEOF' || exit 2
import jax
print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
if jax.default_backend() != "gpu":
    raise SystemExit("no GPU backend: this script checks the compiled kernels; use pytest on a CPU")
PYEOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  2>/dev/null | tee "$OUTDIR/gpu.txt"
date -u +"date %Y-%m-%dT%H:%M:%SZ" | tee -a "$OUTDIR/gpu.txt"

# Float32 references (the xla impl) at full precision; the kernels set their own dot precision.
JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -p no:cacheprovider \
  tests/kernels/test_ssd_pallas.py 2>&1 | tee "$OUTDIR/tests.log"
tests_status=${PIPESTATUS[0]}

"$PY" benchmarks/roofline.py --json "$OUTDIR/roofline.json" 2>&1 | tee "$OUTDIR/roofline.log"

bench_flags=(--impls xla,pallas --dtypes bfloat16,float32 --modes fwd,fwdbwd
             --shapes bsmamba2,sweep --json "$OUTDIR/ssd.json")
# The model's own batch (5 segments): --batch-scale 1.0 where ssd.py has it, else its default.
if "$PY" benchmarks/ssd.py --help 2>/dev/null | grep -q -- "--batch-scale"; then
  bench_flags+=(--batch-scale 1.0)
fi
# shellcheck disable=SC2086
"$PY" benchmarks/ssd.py "${bench_flags[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$OUTDIR/ssd.log"

echo
echo "=== SSD kernels against the card's measured ceilings ==="
cat "$OUTDIR/gpu.txt"
"$PY" benchmarks/roofline.py --ceilings "$OUTDIR/roofline.json" --ssd "$OUTDIR/ssd.json" \
  2>&1 | tee "$OUTDIR/table.txt"
echo "tests: $( [ "$tests_status" = 0 ] && echo passed || echo "FAILED (see $OUTDIR/tests.log)")"
exit "$tests_status"
