#!/usr/bin/env bash
# One command for a fresh GPU box (one H100): kernel correctness at real shapes (bf16, T 4k/8k, GQA 32/8, head dim
# 128, 8 packed sequences; log-probs at V = 128,256) against torch, the kernel benchmarks, a 1-GPU SFT step (MFU),
# the CUDA kernel tests and a DPO step; then one table of every goal with its figure and pass/fail.
#   bash bench/gpu_check.sh [--quick] [other bench/gpu_check.py flags]     <= 8 minutes cold, --quick <= 3
# The venv ($GPU_CHECK_VENV, default ~/.cache/llava-reasoner/gpu-check-venv) sees the machine's own torch and
# triton (--system-site-packages; never reinstalled: requirements.txt pins a torch this box may not have) and gets
# only what is missing, at the pinned versions, with short timeouts; without a package index the stages that
# need a missing package are skipped and say so. Logs and gpu_check.json land in $OUT (default /tmp/gpu_check).
# Exit code: 0 every goal passed, 1 a wrong result / crash / timeout, 2 a speed or memory goal missed.
set -uo pipefail
START=$SECONDS
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
BASE=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-$HOME/.cache/llava-reasoner/gpu-check-venv}
LIMIT=480
for a in "$@"; do [ "$a" = --quick ] && LIMIT=180; done

echo "== venv: $VENV"
if [ ! -x "$VENV/bin/python" ] && ! $BASE -m venv --system-site-packages "$VENV"; then
    echo "could not make a venv: using $BASE as it is"
    VENV=""
fi
PY=${VENV:+$VENV/bin/python}
PY=${PY:-$BASE}
if ! $PY -c "import torch" 2>/dev/null && $BASE -c "import torch" 2>/dev/null; then
    # $BASE is itself a venv or conda env: --system-site-packages reached past it, so point a .pth file at its
    # site-packages (torch and triton are used from there, never copied)
    site=$($PY -c "import site; print(site.getsitepackages()[0])")
    $BASE -c "import sys; print('\n'.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))" \
        > "$site/gpu-check-base.pth"
fi

# module to import -> package to install; torch and triton only if the machine has none
missing=()
for pair in torch:torch triton:triton numpy:numpy PIL:pillow safetensors:safetensors tokenizers:tokenizers \
            tqdm:tqdm pytest:pytest jinja2:jinja2 transformers:transformers; do
    mod=${pair%%:*} pkg=${pair#*:}
    $PY -c "import $mod" 2>/dev/null && continue
    pin=$(grep -hE "^$pkg(==|>=)" requirements.txt requirements-dev.txt | head -1 | cut -d';' -f1 | tr -d ' ')
    missing+=("${pin:-$pkg}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    constraints=$(mktemp)
    $PY -m pip list --format=freeze 2>/dev/null | grep -E "^(torch|triton)==" > "$constraints"   # never replaced
    pipi() { timeout 150 $PY -m pip install -q --disable-pip-version-check --timeout 10 --retries 1 \
             -c "$constraints" "$@"; }
    if ! pipi "${missing[@]}"; then
        echo "== one install for all failed; trying each (no package index: the stages needing them are skipped)"
        for p in "${missing[@]}"; do pipi "$p" || echo "   could not install $p"; done
    fi
fi
$PY -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__)' || exit 1
echo "== setup took $((SECONDS - START)) s"

$PY bench/gpu_check.py --budget $((LIMIT - (SECONDS - START) - 15)) "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
