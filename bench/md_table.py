"""The benches' tables in docs/results.md's form: the command that made them and the commit, then
a markdown table, so the docs are pasted from a bench's output rather than edited by hand."""

import os
import platform
import subprocess
import sys


def _commit() -> str:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    out = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
  except OSError:
    return "unknown"


def render(headers: list[str], rows: list[list], note: str = "") -> str:
  command = " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
  lines = [f"`{command}` (commit {_commit()}, {platform.machine()}, {os.cpu_count()} cores{note}):", ""]
  lines.append("| " + " | ".join(headers) + " |")
  lines.append("|" + " --- |" * len(headers))
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def emit(headers: list[str], rows: list[list], note: str = "") -> None:
  print("\ndocs/results.md form:\n")
  print(render(headers, rows, note))
