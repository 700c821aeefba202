#!/usr/bin/env bash
# One-shot GPU check for a machine lent for ~15 minutes: nothing else needs to be prepared.
#
#   bash benchmarks/gpu_check.sh            # from the repository root (or anywhere: it cd's there)
#
# 1. Python environment: $PYTHON if set; else .venv/bin/python when it imports torch; else it creates
#    .venv and installs requirements.txt (a few minutes of download, not counted in the budget below).
# 2. tests/test_cuda.py (CUDA vs CPU numbers: float32, bf16, fp16 + GradScaler, fused AdamW, SDPA with padding,
#    channels_last, evaluation), on the GPU.
# 3. The GPU rows of the benchmarks: train step and inference (bench_train.py: R50 at 800x1066 and 512x683 and the
#    demo model; math / sdpa / bf16 / channels_last / bf16+channels_last), COCO evaluation (bench_eval.py, CPU
#    libraries on this machine's cores), the matcher's share of a step (bench_matcher.py) and the deformable
#    attention core (bench_msda.py, when present), RT-DETRv2 at 640 (bench_rtdetr.py).
# Budget: about 5 minutes after the install on one H200-class GPU (under 8). GPU_CHECK_COMPILE=1 adds the
# torch.compile variants (a few minutes more). Everything printed is also written to $GPU_CHECK_OUT
# (default runs/gpu_check/): log.txt, the raw JSON, and results.md with the markdown rows for RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${GPU_CHECK_OUT:-runs/gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }
run() {  # run a step, keep going on failure, remember it
    say ""
    say "### $*"
    local start=$SECONDS
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "(exit $rc, $((SECONDS - start)) s)"
    [ "$rc" -eq 0 ] || FAILED+=("$*")
}
FAILED=()

has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
    PY=.venv/bin/python
else
    say "setting up .venv from requirements.txt"
    python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 2>&1 | tail -3 | tee -a "$LOG"
    PY=.venv/bin/python
fi
if ! has_cuda "$PY"; then
    say "error: $PY sees no CUDA device (torch.cuda.is_available() is False); nothing to check"
    exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee -a "$LOG"
START=$SECONDS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run "$PY" -m pytest -q -p no:cacheprovider -p no:xdist -rs tests/test_cuda.py
VARIANTS="math,sdpa,bf16,channels_last,bf16_cl"
[ "${GPU_CHECK_COMPILE:-0}" = 1 ] && VARIANTS="$VARIANTS,compile,all"
run "$PY" benchmarks/bench_train.py --device cuda --configs r50_800,r50_512,demo --variants "$VARIANTS" \
    --iters 10 --warmup 2 --infer_iters 5 --json "$OUT/bench_train.json"
# Deformable DETR and DINO R50 train steps side by side (sdpa and bf16; 'math' = the published explicit attention).
run "$PY" benchmarks/bench_train.py --device cuda --configs deformable_800,dino_800 --variants math,sdpa \
    --iters 3 --warmup 1 --infer_iters 2 --json "$OUT/bench_train_families.json"
run "$PY" benchmarks/bench_matcher.py --device cuda --repeats 20 --demo_steps 5 --train_json "$OUT/bench_train.json"
run "$PY" benchmarks/bench_eval.py --images 1000 --skip_project
# RT-DETRv2 R18vd at 640: the trained model, the inference copy and HF's port side by side, bf16, a train step.
run "$PY" benchmarks/bench_rtdetr.py --device cuda --recipe rtdetrv2_r18vd --size 640 --iters 20 --warmup 3 \
    --variants eager,deploy,hf,hf_deploy,bf16,train --paired eager,deploy,hf,hf_deploy --json "$OUT/bench_rtdetr.json"
if [ -f benchmarks/bench_msda.py ]; then
    run "$PY" benchmarks/bench_msda.py --device cuda --repeats 20 --json "$OUT/bench_msda.json"
fi

# The markdown rows (tables) printed above, with the section they came from, for benchmarks/RESULTS.md.
{
    echo "## GPU check $(date -u +%Y-%m-%d) ($("$PY" -c "import torch; print(torch.cuda.get_device_name(0))"))"
    awk '/^### /{section=$0; printed=0} /^\|/{if(!printed){print ""; print section; printed=1} print}' "$LOG"
} >"$OUT/results.md"
say ""
say "==================== RESULTS.md rows ($OUT/results.md) ===================="
cat "$OUT/results.md"
say ""
say "checks and benchmarks took $((SECONDS - START)) s"
if [ "${#FAILED[@]}" -gt 0 ]; then
    say "FAILED: ${FAILED[*]}"
    exit 1
fi
say "all passed"
