#!/usr/bin/env bash
# The accelerator check of issue 21: on a GPU host, installs the CUDA build of the pinned JAX (into
# .venv-gpu, as launch/gpu_host.sh does, once) and prints one table: the CAM train step at the VOC
# recipe's shape (ResNet-50 OS16, B16 x 512^2) for SIPE and CPAL in float32 and bfloat16 (s/step,
# images/s, share of the card's matmul peak from XLA's FLOP count), DeepLab-v2's step, make_cam
# images/s at VOC size, and the projected wall time of the VOC stages those rates cover.
#
#   bench/accelerator_check.sh [--json out.json] [--steps 10] [--skip cam,seg,make_cam]
#
# About 8 minutes on one card once the wheels are installed (compiles included). Environment:
# CUDA_VISIBLE_DEVICES picks the card (device 0 of what it leaves is timed); CHECK_TIMEOUT (seconds,
# default 900) bounds the timed part; ALLOW_CPU=1 runs it without a GPU (with --smoke: tiny shapes,
# a check of the script itself, figures meaningless).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
python=.venv-gpu/bin/python
if [[ "${ALLOW_CPU:-0}" == 1 && ! -x "$python" ]]; then
  python=${PYTHON:-.venv/bin/python}
elif [[ ! -x "$python" ]]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -r requirements.txt
  .venv-gpu/bin/pip install -q 'jax[cuda12]==0.10.2'
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
platform=$("$python" -c 'import jax; print(jax.devices()[0].platform)')
if [[ "$platform" != gpu && "${ALLOW_CPU:-0}" != 1 ]]; then
  echo "error: JAX sees no GPU (platform $platform); check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES" >&2
  exit 1
fi
# make_cam's bench runs in a second process: without this the first would hold 75% of the card.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec timeout "${CHECK_TIMEOUT:-900}" "$python" bench/accelerator_check.py "$@"
