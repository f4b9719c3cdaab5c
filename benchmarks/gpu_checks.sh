#!/usr/bin/env bash
# Every GPU-side check of the project in one short run, for a session that has a GPU for a few minutes:
# the CUDA tests (Triton kernel compiled for real, bf16 paths), the Triton tile sweep, the scoring-pass
# benchmark (ours vs chunked torch vs Liger vs cut-cross-entropy; whole-pass tokens/s and MFU), the model
# step vs HF and the trainer's tokens/s + MFU. Logs go to $OUT (default /tmp/megacpt-gpu). Wheels for
# packages the machine lacks (liger-kernel, cut-cross-entropy, megatron-core, zstandard) are taken from
# .whl/ when present (the device has Python 3.12 and no network; fetch them here first with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     liger-kernel cut-cross-entropy megatron-core==0.16.1 zstandard
# and carry .whl). Usage: bash benchmarks/gpu_checks.sh       (all steps)
#                              STEPS="score train" bash benchmarks/gpu_checks.sh   (some steps)
set -u
OUT=${OUT:-/tmp/megacpt-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
STEPS=${STEPS:-all}
step() {
  local name=$1 limit=$2; shift 2
  [ "$STEPS" = all ] || [[ " $STEPS " == *" $name "* ]] || return 0
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name rc=$rc"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__)"
step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/model/test_model_features.py -k "cuda or gpu"
step kernel_tune 100 python3 benchmarks/kernel_tune.py
step score 130 python3 benchmarks/score.py --device cuda
step score_compile 150 python3 benchmarks/score.py --device cuda --compile
step model_step 80 python3 benchmarks/model_step.py --device cuda
step train 100 python3 benchmarks/train_throughput.py --device cuda --repeats 1
step fused_loss_step 60 python3 benchmarks/fused_loss_step.py
step train_compile 150 python3 benchmarks/train_throughput.py --device cuda --repeats 1 --compile
step train_unfused 100 python3 benchmarks/train_throughput.py --device cuda --repeats 1 --no-fused-loss
step scoring_tests 60 python3 -m pytest -q -p no:cacheprovider -x tests/scoring
