#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md, in three parts that each fit a 10-minute slot on one H100.
#
#   bash benchmarks/gpu_session.sh checks OUT   # CUDA tests, sparsity_overhead.py, gpu_check.py   (~7 min)
#   bash benchmarks/gpu_session.sh papers OUT   # mup_transfer.py and calibrate_power.py full modes (~9-10 min)
#   bash benchmarks/gpu_session.sh schedule OUT # schedule_transfer.py full mode, after papers       (~5 min)
#                                               # (commit papers' calibrate_power_full.json first)
#
# Run from the repository root. Results go to OUT (JSON, PNG, logs); copy them to benchmarks/results/ and the
# tables to benchmarks/README.md with the machine and date.
set -uo pipefail
part=${1:?usage: gpu_session.sh checks|papers|schedule OUT}
out=${2:?usage: gpu_session.sh checks|papers|schedule OUT}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# The three paper benchmarks pick up where an earlier slot stopped. benchmarks/results/<name>_full.json holding a
# finished result ("complete": true) skips the script (delete the file to run it again); an unfinished one
# ("complete": false) is copied to OUT and the script replays its finished runs (--resume) and trains the rest.
paper_benchmark() {
  local name=$1 limit=$2 lines=$3
  shift 3
  local saved="benchmarks/results/${name}_full.json" resume=()
  if [ -f "$saved" ]; then
    if python -c "import json, sys; sys.exit(not json.load(open(sys.argv[1]))['complete'])" "$saved"; then
      echo "$name: $saved is complete, skipped (delete it to run again)" | tee "$out/$name.txt"
      return
    fi
    cp "$saved" "$out/" && resume=(--resume)
  fi
  timeout -s TERM "$limit" python "benchmarks/$name.py" --device cuda --out "$out" ${resume[@]+"${resume[@]}"} "$@" 2>&1 \
    | tail -"$lines" | tee "$out/$name.txt"
}
# schedule_transfer.py takes the law from this session's calibration, else from the committed one.
calibration="$out/calibrate_power_full.json"
[ -f "$calibration" ] || calibration="benchmarks/results/calibrate_power_full.json"

case "$part" in
  checks)
    timeout -s TERM 150 python -m pytest -q -m cuda -p no:cacheprovider \
      tests/test_sparsity_counting.py tests/test_sparsity_monitor.py 2>&1 | tail -15 | tee "$out/cuda_tests.txt"
    timeout -s TERM 180 python benchmarks/sparsity_overhead.py --device cuda --out "$out" 2>&1 | tee "$out/sparsity_overhead.txt"
    timeout -s TERM 180 python benchmarks/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tail -20 | tee "$out/gpu_check.txt"
    ;;
  papers)
    paper_benchmark mup_transfer 230 30
    paper_benchmark calibrate_power 340 40
    ;;
  schedule)
    paper_benchmark schedule_transfer 300 30 --calibration "$calibration"
    ;;
  *)
    echo "unknown part '$part': use checks, papers or schedule" >&2
    exit 2
    ;;
esac
