"""Up-front free-space checks: a stage that would fill the disk halfway through says so before it
starts, with the size it needs and where."""

import os
import shutil

# Room left for everything else on the volume (logs, the OS, other stages' temporaries).
MARGIN = 1.1


def free_bytes(path: str) -> int:
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path or ".").free


def require(path: str, nbytes: int, what: str) -> None:
  free = free_bytes(os.path.abspath(path))
  if nbytes * MARGIN > free:
    raise OSError(
        f"not enough disk space for {what} in {path}: needs about {human(nbytes * MARGIN)}, "
        f"{human(free)} free; free some space or point --workdir at a larger volume"
    )


def human(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024:
      return f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TB"


def require_like(written: list[str], remaining: int, what: str) -> None:
  """After the first outputs of a per-image stage: the remaining ones, sized like those (compressed
  sizes cannot be known before writing), must fit."""
  sizes = [os.path.getsize(p) for p in written if os.path.exists(p)]
  if sizes and remaining > 0:
    require(os.path.dirname(written[0]), int(sum(sizes) / len(sizes) * remaining), what)
