#!/usr/bin/env bash
# Everything a GPU session needs, in device calls that each fit the 10-minute limit.
# Prepare on the CPU machine first:   make wheelhouse      (kronfluence's wheel: the GPU
# image has torch, triton, transformers, pytest, matplotlib but no registry access)
# Then, with the device tool, carrying .wheelhouse:
#   bash benchmarks/gpu_session.sh check     # build with CUDA, GPU tests, compute-sanitizer
#   bash benchmarks/gpu_session.sh ops       # kernel, grouped and LM-head benchmarks (cuda-full block)
#   bash benchmarks/gpu_session.sh e2e       # pyinf vs kronfluence end to end
#   bash benchmarks/gpu_session.sh scaling   # scaling runs
# Logs go under $OUT (the device tool brings them back); the last lines printed are a
# summary. Benchmark modes update the repo copy's benchmarks/RESULTS.md and
# benchmarks/results/cuda-full/ on the device (so sections of earlier calls carry over when
# those files were copied back into the tree) and copy both into $OUT: copy them back into
# benchmarks/ and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pyinf-gpu}
mkdir -p "$OUT"
mode=${1:-check}
PY=${PYTHON:-python3}
summary="$OUT/summary-$mode.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

note "== $(date -u +%FT%TZ) mode=$mode"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$summary"
$PY - <<'PY' | tee -a "$summary"
import torch, triton
print(f"torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__} device {torch.cuda.get_device_name()}")
PY

if ls .wheelhouse/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps .wheelhouse/*.whl > "$OUT/wheels.log" 2>&1 || note "wheel install failed (see wheels.log)"
fi
start=$(date +%s)
PYINF_CUDA=1 PYINF_BUILD_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  && note "build: ok in $(( $(date +%s) - start )) s" || { note "build: FAILED (build.log)"; tail -30 "$OUT/build.log"; exit 1; }
$PY -m pyinf backends | tee -a "$summary"

case "$mode" in
  check)
    timeout 420 $PY -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_triton_kernels.py tests/test_native.py \
      tests/test_backends_pipeline.py tests/test_pipeline.py tests/test_fused_ce.py > "$OUT/tests.txt" 2>&1
    note "tests: $(tail -1 "$OUT/tests.txt")"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20 | tee -a "$summary"
    $PY -m benchmarks.sanitize > "$OUT/sanitize-plain.txt" 2>&1; note "sanitize (no tool): rc=$?"
    for tool in memcheck racecheck; do
      timeout 120 compute-sanitizer --tool $tool --print-limit 20 $PY -m benchmarks.sanitize native \
        > "$OUT/sanitizer-$tool-native.txt" 2>&1
      note "compute-sanitizer $tool native: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer-$tool-native.txt" | tail -1)"
    done
    timeout 120 compute-sanitizer --tool memcheck --print-limit 20 $PY -m benchmarks.sanitize triton \
      > "$OUT/sanitizer-memcheck-triton.txt" 2>&1
    note "compute-sanitizer memcheck triton: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer-memcheck-triton.txt" | tail -1)"
    ;;
  ops|e2e|scaling)
    sections=$mode; [ "$mode" = ops ] && sections=ops,grouped,head
    timeout 540 $PY -m benchmarks.run --only "$sections" --tag cuda-full --out benchmarks/results/cuda-full \
      > "$OUT/bench-$mode.txt" 2>&1
    note "benchmarks $sections: rc=$?"
    mkdir -p "$OUT/results"
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
    cp benchmarks/results/cuda-full/* "$OUT/results/" 2>/dev/null
    tail -40 "$OUT/bench-$mode.txt"
    ;;
  *) note "unknown mode $mode"; exit 2 ;;
esac
note "== done in $(( $(date +%s) - start )) s"
cat "$summary"
