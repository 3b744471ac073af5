#!/usr/bin/env bash
# Issue #19 item 5 on one lent GPU, one command, < 10 minutes (the device tool's per-call limit):
#   1. the multi-process stages on CUDA with one GPU: world size 1, and two ranks on the one device (gloo),
#      each equal to one process (tests/test_distributed.py, device auto = CUDA here);
#   2. benchmarks/bench_gpu.py --compare: capture with the recording's per-step copies to the CPU (the path
#      before) vs one copy per batch (host_copies), then dreams and capture on today's path and on the tuned
#      ones (ddr_core.performance + larger batches), same chip, one run, with ratios and the MFU targets.
# Results go to $OUT (the device tool's folder) or ./gpu_check_out. Usage, from the repository root:
#   bash scripts/gpu_check_issue19.sh            # TOTAL_S=560 by default; PYTHON=... to pick the interpreter
#   SKIP_TESTS=1 TOTAL_S=240 BENCH_ARGS="--quick --device cpu" PYTHON=.venv/bin/python \
#       bash scripts/gpu_check_issue19.sh        # the CPU smoke test of this script (numbers meaningless)
set -uo pipefail
PYTHON=${PYTHON:-python}
OUT=${OUT:-gpu_check_out}
TOTAL_S=${TOTAL_S:-560}
SKIP_TESTS=${SKIP_TESTS:-0}
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"
mkdir -p "$OUT"
start=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/environment.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("diffusers", "transformers", "pydantic", "polars", "duckdb", "safetensors", "pytest", "dagster"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:  # the bench needs diffusers/transformers/pydantic; the tests also polars/duckdb
        print(name, "MISSING", type(error).__name__)
EOF

echo "== 1. multi-process stages on one GPU (world size 1 and 2 ranks over gloo)"
if [ "$SKIP_TESTS" = 1 ]; then
    echo "skipped (SKIP_TESTS=1)" | tee "$OUT/distributed.txt"
else
    timeout 200 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_distributed.py \
        -k "two_ranks or failing_rank or srun or backend" 2>&1 | tail -25 | tee "$OUT/distributed.txt"
    echo "distributed tests exit code ${PIPESTATUS[0]}" | tee -a "$OUT/distributed.txt"
fi

left=$(( TOTAL_S - ($(date +%s) - start) - 45 ))  # 45 s for model building and the summary
echo "== 2. bench_gpu.py --compare (budget ${left} s)"
timeout $(( left + 60 )) "$PYTHON" benchmarks/bench_gpu.py --compare --budget-s "$left" "${BENCH_EXTRA[@]}" \
    --out "$OUT/bench_gpu_compare.json" 2>&1 | tee "$OUT/bench_gpu_compare.txt" | tail -40
echo "bench exit code ${PIPESTATUS[0]}; total $(( $(date +%s) - start )) s"
