"""N processes x M fake CPU devices of `python -m cpal_jax.main` on this machine: the pod path (one
JAX process per host, one global mesh over all of them) without a pod.

  python launch/local.py N M [--] [main.py flags...]      (launch/local.sh is the same)

Each process gets the coordinator 127.0.0.1:<a free port>, the process count and its index as the
--config.distributed.* keys a pod worker would discover, XLA_FLAGS=--xla_force_host_platform_device_count=M
and JAX_PLATFORMS=cpu. Their output is streamed line by line with a [p<i>] prefix.

Exit status: 0 when every process exits 0. When one exits non-zero (or dies on a signal), the others
are stopped (SIGTERM to their process groups, SIGKILL after LOCAL_LAUNCH_GRACE seconds, default 10:
a peer blocked in a collective with the dead process never returns by itself) and the launcher exits
with the first failure's status: its exit code (75, a preempted run's "run me again", stays 75), or
128 + the signal number. SIGTERM/SIGINT to the launcher are passed on as SIGTERM to every process
(the training loops checkpoint at a step all of them agree on and exit 75); a second one kills them.
LOCAL_LAUNCH_MODULE runs another module than cpal_jax.main with the same flags (the tests' stand-in).
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

USAGE = "usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS [--] [main.py flags...]"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def parse(argv: list[str]) -> tuple[int, int, list[str]]:
  if len(argv) < 2 or not argv[0].isdigit() or not argv[1].isdigit() or int(argv[0]) < 1 or int(argv[1]) < 1:
    print(USAGE, file=sys.stderr)
    sys.exit(2)
  flags = argv[2:]
  if flags[:1] == ["--"]:
    flags = flags[1:]
  return int(argv[0]), int(argv[1]), flags


def commands(n: int, m: int, flags: list[str], port: int) -> list[tuple[list[str], dict]]:
  """(argv, environment) of each process."""
  xla = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
  env = {**os.environ, "XLA_FLAGS": f"{xla} --xla_force_host_platform_device_count={m}".strip()}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixing reader as they are printed
  out = []
  for i in range(n):
    argv = [sys.executable, "-m", os.environ.get("LOCAL_LAUNCH_MODULE", "cpal_jax.main"), *flags]
    argv += [
        "--config.distributed.initialize=true",
        f"--config.distributed.coordinator=127.0.0.1:{port}",
        f"--config.distributed.num_processes={n}",
        f"--config.distributed.process_id={i}",
    ]
    out.append((argv, env))
  return out


def status(returncode: int) -> int:
  """A child's exit status as a shell reports it (a signal s: 128 + s)."""
  return 128 - returncode if returncode < 0 else returncode


def stream(i: int, pipe, lock: threading.Lock) -> None:
  prefix = f"[p{i}] ".encode()
  for line in iter(pipe.readline, b""):
    with lock:
      sys.stdout.buffer.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
      sys.stdout.buffer.flush()
  pipe.close()


def kill_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def run(n: int, m: int, flags: list[str]) -> int:
  port = free_port()
  lock = threading.Lock()
  procs, readers = [], []
  for i, (argv, env) in enumerate(commands(n, m, flags, port)):
    # Its own session per process: stopping one stops its data workers and CRF pool with it.
    proc = subprocess.Popen(
        argv, env=env, cwd=os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    procs.append(proc)
    t = threading.Thread(target=stream, args=(i, proc.stdout, lock), daemon=True)
    t.start()
    readers.append(t)
  print(f"[launch] {n} processes x {m} CPU devices, coordinator 127.0.0.1:{port}", flush=True)

  signalled: list[int] = []

  def on_signal(signum, frame):
    if signalled:  # a second signal: no more waiting for checkpoints
      for p in procs:
        kill_group(p, signal.SIGKILL)
      return
    signalled.append(signum)
    print(f"[launch] {signal.Signals(signum).name}: passed on to every process", flush=True)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, on_signal)

  grace = float(os.environ.get("LOCAL_LAUNCH_GRACE", "10"))
  failure: tuple[int, int] | None = None
  escalate: list[tuple[float, int]] = []  # (when, signal) still to send to the processes left
  while [p.poll() for p in procs].count(None):  # every process polled: any() would stop at the first
    if failure is None:
      failure = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)), None)
      if failure is not None:
        i, code = failure
        print(f"[launch] process {i} exited with status {status(code)}: stopping the others", flush=True)
        now = time.time()
        # A preempted process (75) saved with the others at a step they agreed on: they are
        # finishing the same checkpoint, so they get the grace period before anything is sent.
        first = now + grace if status(code) == 75 else now
        escalate = [(first, signal.SIGTERM), (first + grace, signal.SIGKILL)]
    while escalate and time.time() >= escalate[0][0]:
      _, sig = escalate.pop(0)
      for j, q in enumerate(procs):
        if q.poll() is None:
          if sig == signal.SIGKILL:
            print(f"[launch] process {j} still running {grace:g} s after SIGTERM: killed", flush=True)
          kill_group(q, sig)
    time.sleep(0.1)
  for t in readers:
    t.join(timeout=5)
  if failure is None:
    failure = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0), None)
  if failure is None:
    return 0
  return status(failure[1])


def main() -> None:
  n, m, flags = parse(sys.argv[1:])
  sys.exit(run(n, m, flags))


if __name__ == "__main__":
  main()
