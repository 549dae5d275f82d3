#!/usr/bin/env bash
# The first step on a new GPU box (one H100): kernel correctness at real shapes (bf16, T 4k/8k, GQA 32/8, head dim
# 128, 8 packed sequences; log-probs at V = 128,256) against torch, which path LLAVA_KERNELS=auto picks per shape
# class, a failing launch falling back, one dtype and no host sync in the training micro-batches, the kernel
# benchmarks, a 1-GPU SFT step (MFU), sampling, a DPO step, FSDP2 over every GPU and the CUDA kernel tests; then one
# table of every goal with its figure and pass/fail.
#   bash bench/gpu_check.sh [--quick] [--skip NAME,...] [other bench/gpu_check.py flags]   <= 8 minutes
# (--quick: the correctness and dispatch stages alone, <= 3 minutes)
# Python: the machine's own ($PYTHON, default python3) when it imports torch and triton, used as it is: nothing is
# installed. Only a machine without them gets a venv (--system-site-packages, $GPU_CHECK_VENV), and pip runs only if
# a package index answers within 5 seconds. A stage whose modules do not import FAILS (--skip it on purpose); so does
# one the budget leaves no time for. Logs and gpu_check.json land in $OUT (default /tmp/gpu_check).
# Exit code: 0 every goal passed, 1 a wrong result / crash / timeout / unplanned skip, 2 a speed or memory goal missed.
set -uo pipefail
START=$SECONDS
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LIMIT=480
for a in "$@"; do [ "$a" = --quick ] && LIMIT=180; done

if $PY -c "import torch, triton" 2>/dev/null; then
    echo "== python: $PY, with its own torch and triton (nothing installed)"
else
    VENV=${GPU_CHECK_VENV:-$HOME/.cache/llava-reasoner/gpu-check-venv}
    if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        echo "== $VENV has no pip: made anew"
        rm -rf "$VENV"
    fi
    [ -x "$VENV/bin/python" ] || $PY -m venv --system-site-packages "$VENV" || { echo "FAIL: cannot make $VENV"; exit 1; }
    PY=$VENV/bin/python
    missing=()
    for pair in torch:torch triton:triton numpy:numpy PIL:pillow safetensors:safetensors tokenizers:tokenizers \
                tqdm:tqdm pytest:pytest jinja2:jinja2 transformers:transformers; do
        mod=${pair%%:*} pkg=${pair#*:}
        $PY -c "import $mod" 2>/dev/null && continue
        pin=$(grep -hE "^$pkg(==|>=)" requirements.txt requirements-dev.txt | head -1 | cut -d';' -f1 | tr -d ' ')
        missing+=("${pin:-$pkg}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if $PY -c "import socket; socket.create_connection(('pypi.org', 443), 5).close()" 2>/dev/null; then
            echo "== installing: ${missing[*]}"
            timeout 180 $PY -m pip install -q --disable-pip-version-check --timeout 10 --retries 0 "${missing[@]}" \
                || echo "   the install failed: the stages that need those modules fail"
        else
            echo "== no package index answers: nothing installed (missing: ${missing[*]}); the stages that need them fail"
        fi
    fi
fi
$PY -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__)' \
    || { echo "FAIL: torch and triton do not import"; exit 1; }
echo "== setup took $((SECONDS - START)) s"

$PY bench/gpu_check.py --budget $((LIMIT - (SECONDS - START) - 10)) "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
