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

# The three paper benchmarks continue a run cut short in an earlier slot: when
# benchmarks/results/<name>_full.json holds an unfinished result ("complete": false), it is copied to OUT and the
# script replays its finished runs (--resume) and trains the rest.
continue_flag() {
  local saved="benchmarks/results/$1_full.json"
  if [ -f "$saved" ] && python -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['complete'])" "$saved"; then
    cp "$saved" "$out/" && echo "--resume"
  fi
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
    timeout -s TERM 230 python benchmarks/mup_transfer.py --device cuda --out "$out" $(continue_flag mup_transfer) 2>&1 | tail -30 | tee "$out/mup_transfer.txt"
    timeout -s TERM 340 python benchmarks/calibrate_power.py --device cuda --out "$out" $(continue_flag calibrate_power) 2>&1 | tail -40 | tee "$out/calibrate_power.txt"
    ;;
  schedule)
    timeout -s TERM 300 python benchmarks/schedule_transfer.py --device cuda --out "$out" --calibration "$calibration" \
      $(continue_flag schedule_transfer) 2>&1 | tail -30 | tee "$out/schedule_transfer.txt"
    ;;
  *)
    echo "unknown part '$part': use checks, papers or schedule" >&2
    exit 2
    ;;
esac
