#!/usr/bin/env bash
# Runs cpal_jax on every worker of a Cloud TPU VM pod slice (creates the slice if it is absent).
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE [main.py flags...]
#   launch/tpu_pod.sh cpal-v4 us-central2-b v4-32 --config=configs/voc.py \
#       --config.data.root=/mnt/data/VOCdevkit/VOC2012 --workdir=/mnt/runs/voc
#
# Every worker runs the same command with --config.distributed.initialize=true (JAX then finds the
# other workers through the TPU metadata); the data root and workdir must be visible to all workers
# (a mounted bucket or filestore). The committed HEAD is shipped, not the working tree.
# Environment: TPU_RUNTIME (default tpu-ubuntu2204-base), LOG_DIR (default launch-logs).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
name=$1 zone=$2 accel=$3
shift 3
runtime=${TPU_RUNTIME:-tpu-ubuntu2204-base}
log_dir=${LOG_DIR:-launch-logs}
repo=$(git rev-parse --show-toplevel)

if ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$runtime"
fi

tarball=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$tarball"' EXIT
git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
gcloud compute tpus tpu-vm scp "$tarball" "$name":cpal_jax.tar.gz --zone "$zone" --worker=all

flags=$(printf ' %q' "$@")
remote="set -euo pipefail
rm -rf cpal_jax && mkdir cpal_jax && tar xzf cpal_jax.tar.gz -C cpal_jax && cd cpal_jax
python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q 'jax[tpu]==0.10.2' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
.venv/bin/python -m cpal_jax.main --config.distributed.initialize=true${flags}"

mkdir -p "$log_dir"
log="$log_dir/$name-$(date +%Y%m%d-%H%M%S).log"
echo "running on every worker of $name; output also in $log"
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$remote" 2>&1 | tee "$log"
