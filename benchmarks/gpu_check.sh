#!/usr/bin/env bash
# Issue 12's GPU measurements in one call of a lent GPU machine (at most 9 minutes: DEADLINE):
# the `brats-gpu` recipe's training step and its loader per worker count (bench_train.py), a short
# `brats-gpu` training run (its first on a GPU), `tumorseg predict` on whole cases with and without
# TTA, and prediction seconds per case of PyTorch against torch.compile (bench_predict.py).
# Synthetic cases of BraTS geometry stand in for the real ones, which do not travel.
#
#   bash benchmarks/gpu_check.sh OUT_DIR        # from the repository root
#
# The lent machine is bare (no MONAI, no nibabel): put their wheels in .whl/ (ignored by git) and
# carry it; the script installs them. Here, once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl monai==1.6.1 nibabel==5.4.2
# Each step has its own time limit and the next step runs after a failure; everything lands in
# OUT_DIR/gpu_check.log beside the benchmarks' JSON (at most 8 files, as the device tool returns).
# DEVICE=cpu CASES=2 SHORT=1 runs the same steps small on the CPU, to check the script itself.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
WORK=${WORK:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
CASES=${CASES:-10}
SHORT=${SHORT:-0}
PY=${PYTHON:-python3}
rm -rf "$WORK"  # a warm machine keeps the last call's run folder, which train would refuse
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: >"$LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

DEADLINE=${DEADLINE:-540}  # seconds for all steps: the device tool stops a command at 600
step() {  # step NAME SECONDS COMMAND...: timed, logged, and the script goes on if it fails
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  ((limit > DEADLINE - SECONDS)) && limit=$((DEADLINE - SECONDS))
  if ((limit < 10)); then echo "=== $name: skipped, the deadline is near" | tee -a "$LOG"; return; fi
  echo "=== $name ($(date +%T), at most $limit s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

if [ "$SHORT" = 1 ]; then  # the script's own check: the same steps, tiny
  train_size=(--epochs 1 --steps-per-epoch 2 --patch 64,64,64 --filters 8,16,32,64,64 --workers 2)
  bench_size=(--recipe brats-cpu --steps 2 --batches 2 --workers 0,2)
  predict_size=(--networks unet-lite --tta off --repeat 1 --warmup 0)
else
  train_size=(--epochs 2 --steps-per-epoch 60)
  bench_size=(--recipe brats-gpu --workers 0,4,8,12)
  predict_size=(--networks dynunet,unet3d --tta both)
fi

step gpu 20 nvidia-smi
step versions 60 $PY -c "import torch, monai, nibabel; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', 'monai', monai.__version__, 'nibabel', nibabel.__version__)"
step synth 60 $PY -m tumorseg synth "$WORK/data" --cases "$CASES" --seed 1
step prepare 60 $PY -m tumorseg prepare "$WORK/data" "$WORK/prep" --recipe brats-gpu --workers 8
step bench_train 120 $PY benchmarks/bench_train.py --prepared "$WORK/prep" --device "$DEVICE" \
  "${bench_size[@]}" --out "$OUT/bench_train.json"
step train 150 $PY -m tumorseg train "$WORK/prep" "$WORK/run" --recipe brats-gpu --device "$DEVICE" "${train_size[@]}"
cp "$WORK/run/metrics.csv" "$OUT/train_metrics.csv" 2>/dev/null
step predict_tta 60 $PY -m tumorseg predict "$WORK/run" "$WORK/data" "$WORK/preds_tta" --device "$DEVICE"
step predict 40 $PY -m tumorseg predict "$WORK/run" "$WORK/data" "$WORK/preds" --device "$DEVICE" --no-tta
step bench_predict 120 $PY benchmarks/bench_predict.py --device "$DEVICE" --engines torch,compile \
  "${predict_size[@]}" --out "$OUT/bench_predict.json"
step evaluate 30 $PY -m tumorseg evaluate "$WORK/preds_tta" "$WORK/data" --workers 8 --out "$OUT/evaluate.csv"
echo "=== done ($(date +%T))" | tee -a "$LOG"
