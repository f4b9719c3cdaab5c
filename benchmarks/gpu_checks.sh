#!/usr/bin/env bash
# Every GPU check of issue 18 in one run of at most ~9.5 minutes on one H100/H200, for a session that has a
# GPU for a few minutes. Steps, in priority order (a step is skipped when the time left is under its
# minimum; each runs under `timeout` of its limit or the time left, whichever is less):
#   gpu_tests   pytest: the Triton forward and backward compiled for real against the fp32 reference,
#               bf16 paths, TE vs torch parity and TE fp8 (`-m gpu`, skipped without transformer-engine)
#   train       benchmarks/train_throughput.py, Pythia-1B then 1.4B, seq 2048, micro 8 x global 16, bf16:
#               torch (megacpt train), hf-compile (plain HF loop + torch.compile), torch-tritonbwd (the
#               fused loss's Triton backward), torch-compile (per-block compile), te, te-fp8 -> tokens/s, TFLOP/s, MFU with and without attention FLOPs, peak memory (+ the
#               sizing model's prediction), ratio to hf-compile, data-loader share of step time
#   flce        benchmarks/score.py --output-layer-only: fused linear+CE fwd and fwd+bwd at Pythia-1B/6.9B
#               output shapes (N 16,384, V 50,304): Triton backward vs chunked torch backward vs Liger vs
#               cut-cross-entropy
#   sizing      train_throughput.py --sizing: Pythia-6.9B shape with 2, 4, 8 layers (micro 4 x 2048,
#               selective recompute) + AdamW s/param -> sizing_6.9b.json -> benchmarks/sizing.py: days per
#               2.4B / 24B tokens on 8 and 32 GPUs, TP=2 + FSDP and the recommended layout
#   train_1.4b  the train step for Pythia-1.4B
#   fp8_curve   (transformer-engine only) train_throughput.py --loss-curve 200: te, te-fp8, torch from the
#               same weights on learnable synthetic tokens: fp8 - bf16 loss difference vs TE - torch noise
#   bwd_tune    benchmarks/kernel_tune.py --backward: tile sweep of the dlogits kernel (if time is left)
# Output: $OUT (default /tmp/megacpt-gpu), at most 8 files, for docs/gpu-logs/: summary.log (environment,
# each step's tail, rc and seconds), gpu_tests.log, train.log + train.json (all presets and the fp8 curve
# output), flce.log (score.py + bwd_tune), sizing.log + sizing_6.9b.json, fp8_curve.json.
#
# Packages the device lacks, carried as wheels in .whl/ (the device has Python 3.12, torch 2.11 cu130,
# Triton 3.6, no network). Fetch them here, then name .whl in the device tool's `carry`:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1 megatron-core==0.16.1 zstandard==0.25.0
# (about 9 MB together: megatron-core and zstandard are megacpt dependencies the image does not have;
# liger-kernel and cut-cross-entropy are the loss baselines.) Found on PyPI, 2026-12, and NOT carryable:
#   - transformer-engine 2.20.2: the core wheel transformer_engine_cu13 is 276 MB (the tool carries 64 MiB
#     a call), and transformer-engine-torch has no wheel at all (sdist, compiled against the local torch
#     with nvcc; minutes to tens of minutes). So on this workplace's device the te / te-fp8 rows, the TE
#     parity tests and the fp8 curve report "transformer-engine not installed". On a GPU box with network:
#     pip install --no-build-isolation "transformer-engine[pytorch]==2.20.2", then this script measures them.
#   - flash-attn 2.8.3: sdist only (a CUDA build of an hour or more); the torch path uses SDPA's
#     FlashAttention-2 / cuDNN kernels (model.attention_backend sdpa_flash | cudnn), which need nothing.
#   - nvidia-dali-cuda130 2.4.0: 199 MB. Not needed: the data-loader share is measured on megacpt's own
#     loader (train step, "data share" column); DALI would be worth building only above 1% (docs/benchmarks.md).
#
# Usage: bash benchmarks/gpu_checks.sh                       (all steps, ~9.5 min budget)
#        STEPS="train sizing" bash benchmarks/gpu_checks.sh  (some steps)   BUDGET_S=1800 ...  (a longer lease)
# As one device-tool call:
#   run(command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
#        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; bash benchmarks/gpu_checks.sh",
#       carry=[".whl"], timeout_s=600)
set -u
OUT=${OUT:-/tmp/megacpt-gpu}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-570}
STEPS=${STEPS:-all}
T0=$(date +%s)
SUMMARY="$OUT/summary.log"
if ls .whl/*.whl >/dev/null 2>&1 && [[ ":${PYTHONPATH:-}:" != *":/tmp/site:"* ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

# step NAME LOG LIMIT_S MIN_S CMD...: append CMD's output to $OUT/LOG, its tail and rc to the summary
step() {
  local name=$1 log=$2 limit=$3 min=$4; shift 4
  [ "$STEPS" = all ] || [[ " $STEPS " == *" $name "* ]] || return 0
  local rem; rem=$(left)
  if [ "$rem" -lt "$min" ]; then
    echo "=== $name skipped: ${rem}s left of the ${BUDGET_S}s budget, needs ${min}s" | tee -a "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$SUMMARY" >> "$OUT/$log"
  local s0; s0=$(date +%s)
  timeout "$limit" "$@" >> "$OUT/$log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$log" >> "$SUMMARY"
  echo "=== $name rc=$rc in $(( $(date +%s) - s0 ))s" | tee -a "$SUMMARY"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 - <<'EOF'
import importlib
for m in ("transformer_engine.pytorch", "flash_attn", "liger_kernel", "cut_cross_entropy", "megatron.core", "apex"):
    try:
        mod = importlib.import_module(m)
        print(f"{m}: {getattr(mod, '__version__', 'installed')}")
    except Exception as e:  # noqa: BLE001 - report, do not stop
        print(f"{m}: not available ({type(e).__name__}: {str(e)[:80]})")
EOF
  git log --oneline -1 2>/dev/null || true
} > "$SUMMARY" 2>&1
cat "$SUMMARY"

TT="python3 benchmarks/train_throughput.py --device cuda"
step gpu_tests gpu_tests.log 120 60 python3 -m pytest -q -p no:cacheprovider -x tests/kernels tests/model \
  -k "cuda or gpu or real_te"
step train train.log 200 90 $TT --presets pythia-1b --json-out "$OUT/train.json"
step flce flce.log 100 45 python3 benchmarks/score.py --device cuda --output-layer-only
step sizing sizing.log 90 45 $TT --sizing --preset pythia-6.9b --layers 2 4 8 --json-out "$OUT/sizing_6.9b.json"
step sizing sizing.log 20 5 python3 benchmarks/sizing.py "$OUT/sizing_6.9b.json" --gpus 8 32
step train_1.4b train.log 200 90 $TT --presets pythia-1.4b --json-out "$OUT/train_1.4b.json"
if python3 -c "import transformer_engine.pytorch" >/dev/null 2>&1; then
  step fp8_curve train.log 150 90 $TT --loss-curve 200 --preset pythia-1b --micro-batch 4 --json-out "$OUT/fp8_curve.json"
else
  echo "=== fp8_curve skipped: transformer-engine is not installed here" | tee -a "$SUMMARY"
fi
step bwd_tune flce.log 90 40 python3 benchmarks/kernel_tune.py --backward --hidden 2048
# one JSON for both train presets keeps $OUT within the device tool's 8 files
if [ -f "$OUT/train_1.4b.json" ]; then
  python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = json.loads((out / "train.json").read_text()) if (out / "train.json").exists() else []
rows += json.loads((out / "train_1.4b.json").read_text())
(out / "train.json").write_text(json.dumps(rows, indent=1))
(out / "train_1.4b.json").unlink()
EOF
fi
echo "=== done in $(( $(date +%s) - T0 ))s; files: $(ls "$OUT" | tr '\n' ' ')" >> "$SUMMARY"
tail -c 11000 "$SUMMARY"  # the device tool returns the last 12,000 characters of the output
