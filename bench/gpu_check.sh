#!/usr/bin/env bash
# One command for one H100 (<= 8 minutes): the kernel tests on CUDA (bf16, fp16, fp32), the kernel benchmark table,
# then a 1-GPU SFT step of a ~1B LLaVA-NeXT (tokens/s, MFU) and a DPO step (pairs/s, live and precomputed reference).
# Uses the machine's own python3 (torch + triton + pytest + transformers preinstalled; no network needed).
#   bash bench/gpu_check.sh            logs land in $OUT (or /tmp/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
$PY -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader || true

echo "== kernel tests (CUDA)"
timeout 200 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT_DIR/kernel_tests.log"
tests=${PIPESTATUS[0]}

echo "== kernel benchmarks"
timeout 110 $PY bench/kernels_bench.py 2>&1 | tee "$OUT_DIR/kernels_bench.log"
bench=${PIPESTATUS[0]}

echo "== SFT step, ~1B LLaVA-NeXT, bf16, packed"
timeout 80 $PY bench/sft_speed.py --gpu 2>&1 | tee "$OUT_DIR/sft_gpu.log"
sft=${PIPESTATUS[0]}

echo "== DPO step, ~1B, 2 x 2k-token pairs, live and precomputed reference"
timeout 60 $PY bench/dpo_speed.py 2>&1 | tee "$OUT_DIR/dpo_gpu.log"
dpo=${PIPESTATUS[0]}

echo "== exit codes: tests $tests, kernel benchmarks $bench, SFT $sft, DPO $dpo"
exit $(( tests != 0 || bench != 0 || sft != 0 || dpo != 0 ))
