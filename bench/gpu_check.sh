#!/usr/bin/env bash
# The prepared GPU check (one H100 / H200, at most 9 minutes): every mode of bench/gpu_bench.py at real size,
# random-weight Qwen3-VL-4B, today's code beside the code as it was. The tables go to stdout and to
# ${OUT:-bench}/gpu_check.md, to be pasted into bench/RESULTS.md.
#   bash bench/gpu_check.sh            # GPU
#   bash bench/gpu_check.sh --thin     # CPU: the same commands on a thin slice (tests/test_gpu_bench.py)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench}
MD=$OUT/gpu_check.md
rm -f "$MD"
if [ "${1:-}" = "--thin" ]; then
  SIZE=(--layers 1 --vocab 4096 --narrow 8); SFT=(--micro-batch 1 --seq-len 32 --steps 1)
  OPCD=(--batch 2 --micro-batch 2 --new-tokens 8); ROLLOUT=(--rollout-batch 2 --rollout-tokens 4)
else
  SIZE=(); SFT=(--micro-batch 4 --seq-len 2048 --steps 3)
  OPCD=(--batch 4 --micro-batch 4 --new-tokens 2048); ROLLOUT=(--rollout-batch 32 --rollout-tokens 128)
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu_check.card"
status=0
# Each mode has its own time limit (seconds), so that one slow mode cannot take the others' turn; a mode
# cut short keeps the rows it finished.
timeout 270 "$PY" bench/gpu_bench.py --only sft "${SIZE[@]}" "${SFT[@]}" --markdown "$MD" || status=1
timeout 140 "$PY" bench/gpu_bench.py --only opcd "${SIZE[@]}" "${OPCD[@]}" --markdown "$MD" || status=1
timeout 130 "$PY" bench/gpu_bench.py --only rollout "${SIZE[@]}" "${ROLLOUT[@]}" --markdown "$MD" || status=1
exit $status
