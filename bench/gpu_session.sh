#!/usr/bin/env bash
# The GPU checks and benchmarks, in stages, each under its own time limit so that one slow
# stage cannot use up a call (a device call may run 10 minutes):
#   bash bench/gpu_session.sh                       first call: build, sp24, bench
#   bash bench/gpu_session.sh build tests memcheck  second call
# Each call's limits add up to under the 10 minutes a device call may run: build 200 s,
# sp24 150 s, bench 240 s; tests 240 s, memcheck 150 s.
#   stages: build   the extension (incremental; MAX_JOBS=16)
#           sp24    the cuda tests of the sparse tensor-core and Triton kernels, first failure stops
#           bench   bench/bench_cuda.py + bench/bench_triton.py -> $OUT/<device>.json, table
#           tests   the whole suite (with a GPU the cuda tests run and Triton compiles)
#           memcheck  compute-sanitizer memcheck on the sparse tensor-core tests
# Logs and results go to $OUT (default bench/results). The GPU machine has torch and triton
# but no network: the build uses what is installed.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PY:-python3}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build sp24 bench)
log() { echo "== $* ($(date +%T))"; }
status=0

for stage in "${STAGES[@]}"; do
  case "$stage" in
    build)
      log "build"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      if ! MAX_JOBS=16 timeout 200 $PY -m pip install --quiet --no-build-isolation --no-deps -e . \
          > "$OUT/build.log" 2>&1; then
        tail -40 "$OUT/build.log"; exit 1
      fi
      $PY -c "import sparsekit as sk; print(sk.build_info())"
      ;;
    sp24)
      log "sparse tensor-core and Triton kernels on the GPU (cuda tests)"
      timeout 150 $PY -P -m pytest tests/test_sp24.py tests/test_triton_nm_gemm.py \
        tests/test_triton_masked_gemm.py -q -m cuda -x -p no:cacheprovider > "$OUT/sp24.log" 2>&1
      rc=$?; echo "sp24 rc=$rc"; [ $rc -ne 0 ] && status=1
      tail -3 "$OUT/sp24.log"; grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/sp24.log" | head -20
      # What a 2:4 layer runs here (the dispatcher's self-check decides between sp24 and Triton).
      $PY -P -c "
import torch, sparsekit as sk
for dt in (torch.float16, torch.bfloat16):
    layer = sk.SparseLinear.from_dense(torch.nn.Linear(256, 96), '2:4').to('cuda', dt)
    x = torch.randn(3, 256, device='cuda', dtype=dt)
    print(sk.explain('nm_linear', x, layer.values, layer.metadata, None, 256, 2, 4))
"
      ;;
    tests)
      log "tests (all of them)"
      timeout 240 $PY -P -m pytest tests -q -p no:cacheprovider -n 8 > "$OUT/tests.log" 2>&1
      rc=$?; echo "tests rc=$rc"; [ $rc -ne 0 ] && status=1
      tail -5 "$OUT/tests.log"; grep -E "^FAILED" "$OUT/tests.log" | head -20
      ;;
    memcheck)
      log "compute-sanitizer memcheck (the sparse tensor-core tests)"
      SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
      if [ -n "$SAN" ]; then
        timeout 150 "$SAN" --tool memcheck --error-exitcode 9 $PY -P -m pytest tests/test_sp24.py \
          -q -m cuda -x -p no:cacheprovider -k "not 8192" > "$OUT/memcheck.log" 2>&1
        rc=$?; echo "memcheck rc=$rc"; [ $rc -ne 0 ] && status=1
        grep -E "ERROR SUMMARY|passed|failed|Invalid" "$OUT/memcheck.log" | tail -5
      else
        echo "no compute-sanitizer found"; status=1
      fi
      ;;
    bench)
      log "benchmarks"
      DEVICE=$($PY -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
      timeout 240 $PY -P -m pytest bench/bench_cuda.py bench/bench_triton.py --benchmark-only -q \
        -p no:cacheprovider --benchmark-json="$OUT/$DEVICE.json" > "$OUT/bench.log" 2>&1
      rc=$?; echo "bench rc=$rc"; [ $rc -ne 0 ] && status=1
      tail -3 "$OUT/bench.log"
      [ -s "$OUT/$DEVICE.json" ] && $PY bench/report.py "$OUT/$DEVICE.json"
      ;;
    *)
      echo "unknown stage '$stage' (build, sp24, bench, tests, memcheck)"; exit 2
      ;;
  esac
done
exit $status
