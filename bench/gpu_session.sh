#!/usr/bin/env bash
# One call on a GPU machine: build, GPU tests, compute-sanitizer, benchmarks.
#   bash bench/gpu_session.sh            (writes $OUT/<device>.json and logs, if $OUT is set)
# The GPU machine has torch and triton but no network: the build uses what is installed.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PY:-python3}
log() { echo "== $*"; }

log "build"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
MAX_JOBS=16 $PY -m pip install --quiet --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
$PY -c "import sparsekit as sk; print(sk.build_info())"

log "tests (all of them: with a GPU the cuda tests run and the Triton kernels compile)"
$PY -P -m pytest tests -q -p no:cacheprovider -n 8 > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -5 "$OUT/tests.log"; grep -E "^FAILED" "$OUT/tests.log" | head -20

log "compute-sanitizer memcheck (the CUDA kernels' tests)"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  timeout 300 "$SAN" --tool memcheck --error-exitcode 9 $PY -P -m pytest tests/test_sp24.py -q -m cuda -x \
    -p no:cacheprovider -k "not 8192" > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3
else
  echo "no compute-sanitizer found"
fi

log "benchmarks"
DEVICE=$($PY -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
$PY -P -m pytest bench/bench_cuda.py $(ls bench/bench_triton.py 2>/dev/null) --benchmark-only -q \
  -p no:cacheprovider --benchmark-json="$OUT/$DEVICE.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -3 "$OUT/bench.log"
$PY bench/report.py "$OUT/$DEVICE.json"
