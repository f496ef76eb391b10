#!/usr/bin/env bash
# Runs cpal_jax as N JAX processes x M fake CPU devices on this machine: the multi-process (pod) path
# of a TPU pod or multi-host GPU job, on a laptop.
#
#   launch/local.sh N M [--] [main.py flags...]
#   launch/local.sh 2 2 -- --config=configs/synthetic.py:smoke --workdir=runs/pod2x2
#
# Every process runs `python -m cpal_jax.main` with the given flags plus the coordinator
# (127.0.0.1:<a free port>), the process count and its index (--config.distributed.*); their logs
# are prefixed [p<i>]. When one process fails the others are stopped and the status of the failure
# is the script's (75 = preempted, run the same command again to resume). launch/local.py has the
# details. Environment: PYTHON (default: the checkout's .venv/bin/python, else python3),
# LOCAL_LAUNCH_GRACE (seconds a process gets after SIGTERM before SIGKILL, default 10).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-}
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then
    python="$repo/.venv/bin/python"
  else
    python=python3
  fi
fi
# The package is imported from the checkout whatever the current folder (relative paths in the
# flags, --workdir included, stay relative to it).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$repo/launch/local.py" "$@"
