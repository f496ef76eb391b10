"""How a stage's per-image outputs were made, kept beside them.

Stages that write one file per image skip the files that exist, so that an interrupted run resumes.
A record of the checkpoint step and inference protocol keeps a later run with another one (a new
checkpoint, other scales, another read of the maps) from silently mixing old and new files: it is
refused with the differing keys and what to delete, and nothing written is touched.
"""

import json
import os
import subprocess

import jax

from cpal_jax import paths

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
  """The short commit of the checkout this package runs from, "+dirty" with uncommitted changes to
  tracked files; "unknown" outside a git checkout."""
  try:
    run = lambda *a: subprocess.run(
        ["git", "-C", _REPO, *a], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    commit = run("rev-parse", "--short", "HEAD")
    return commit + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def flat(prefix: str, tree) -> dict:
  """{prefix.key.sub: leaf} of a nested dict or ConfigDict, leaves as JSON would read them back."""
  tree = tree.to_dict() if hasattr(tree, "to_dict") else tree
  out = {}
  for k, v in tree.items():
    name = f"{prefix}.{k}" if prefix else k
    if isinstance(v, dict):
      out.update(flat(name, v))
    else:
      out[name] = v
  return json.loads(json.dumps(out))


def check(path: str, current: dict, outputs_exist: bool, outputs: str, fix: str) -> bool:
  """Refuses when outputs exist and `path` records another protocol; True when they exist with
  this one's record.

  Outputs without a record (a workdir from before the record existed) cannot be checked: the
  current protocol becomes their record.
  """
  current = json.loads(json.dumps(current))
  if not (outputs_exist and os.path.exists(path)):
    return False
  with open(path) as f:
    saved = json.load(f)
  if saved != current:
    keys = [k for k in {**saved, **current} if saved.get(k) != current.get(k)]
    diff = ", ".join(f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in keys)
    raise ValueError(f"{outputs} were made with another checkpoint or protocol ({diff}); {fix}")
  return True


def check_or_record(path: str, current: dict, outputs_exist: bool, outputs: str, fix: str) -> None:
  """check, then records `current` where no record of these outputs holds."""
  if not check(path, current, outputs_exist, outputs, fix) and jax.process_index() == 0:
    paths.write_text(path, json.dumps(json.loads(json.dumps(current)), indent=2) + "\n")
