#!/usr/bin/env bash
# Runs cpal_jax on one multi-GPU host: one process drives all local GPUs through the device mesh.
#
#   launch/gpu_host.sh [main.py flags...]
#   launch/gpu_host.sh --config=configs/voc.py --config.data.root=/data/VOCdevkit/VOC2012 --workdir=runs/voc
#
# Installs the CUDA build of the pinned JAX into .venv-gpu on first use. train.batch_size must be
# divisible by the number of GPUs. Environment: CUDA_VISIBLE_DEVICES selects GPUs as usual.
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
cd "$repo"
if [[ ! -x .venv-gpu/bin/python ]]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -r requirements.txt
  .venv-gpu/bin/pip install -q 'jax[cuda12]==0.10.2'
fi
.venv-gpu/bin/python -c 'import jax; d = jax.devices(); print(f"{len(d)} devices: {d[0].device_kind}")'
exec .venv-gpu/bin/python -m cpal_jax.main "$@"
