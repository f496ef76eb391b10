"""IRN's pixel-pair machinery (docs/method.md 1.5 D3/D4): search directions, line paths, edge -> affinity,
affinity labels and the boundary-network loss, as jnp functions with static shapes.

Layout. Every per-pair array is [B, N, h, w]: index (b, n, y, x) is the pair (p, p + d_n) with source
p = (y, x) and d_n = offsets(radius)[n] as (dy, dx). The directions are IRN's half-disc
(`PathIndex.get_all_dir_paths`): (0, x) for 0 < x < r and (y, x) for 0 < y < r, |x| < r, x² + y² < r².
It never holds both d and -d, so each unordered pair appears once; the random walk adds the reverse
directions itself. The channel order is IRN's: directions grouped by path length (ascending), in search
order within a length. That is the order of IRN's `path_dst`, its affinity channels and its affinity
labels, so arrays here line up with IRN's channel for channel.

Border. IRN crops its sources so that every destination is inside the map; here every pixel is a source
in every direction, so the shapes stay static, and a pair whose destination falls outside the map gets
affinity 0 (the edge map is padded with 1.0, as IRN's random walk pads it) and label 0 in all three pair
classes (so the loss ignores it). A destination inside the map implies the whole path is inside: a path
stays in the bounding box of its two ends.

IRN's training window. IRN's training-time PathIndex (no padding) takes sources only in the window
rows < h - (r-1), r-1 <= columns < w - (r-1). A source near the left, right or bottom border is dropped
in every direction, including directions whose destination is inside. `irn_window=True` in
`pair_labels` / `affinity_loss` reproduces exactly IRN's set of pairs; the default keeps every pair
whose two ends are in the map, which differs only in that border band.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255
LOSS_EPS = 1e-5  # IRN's epsilon inside the logs and in the pair-count denominators


@functools.lru_cache(maxsize=None)
def _dir_paths(radius: int) -> tuple[np.ndarray, ...]:
  """IRN's PathIndex.get_all_dir_paths: one [L, 2] (dy, dx) array per direction, in channel order.

  A path holds the integer points of the segment's bounding box within distance < 1 of the segment
  (source (0, 0) and destination included), the destination first.
  """
  if radius < 2:
    raise ValueError(f"radius must be >= 2 (radius {radius} has no directions)")
  dirs = [(0, x) for x in range(1, radius)]
  dirs += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius) if x * x + y * y < radius**2]
  by_length: dict[int, list[np.ndarray]] = {}
  for dy, dx in dirs:
    len_sq = dy * dy + dx * dx
    # IRN tests (dy*x - dx*y)² / len_sq < 1 in floats; the integer form is the same test without rounding.
    coords = [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < len_sq
    ]
    coords.sort(key=lambda c: -abs(c[0]) - abs(c[1]))  # stable, as IRN's: the destination comes first
    path = np.asarray(coords, np.int32)
    path.setflags(write=False)  # cached and shared between callers
    by_length.setdefault(len(coords), []).append(path)
  return tuple(p for length in sorted(by_length) for p in by_length[length])


def offsets(radius: int) -> np.ndarray:
  """[N, 2] int32 (dy, dx) search directions in IRN's channel order (N = 34 for radius 5, 152 for 10)."""
  return np.stack([p[0] for p in _dir_paths(radius)])


def paths(radius: int) -> tuple[np.ndarray, ...]:
  """N read-only [L_n, 2] int32 (dy, dx) arrays: the pixels of each direction's line, destination first,
  source (0, 0) included, relative to the source."""
  return _dir_paths(radius)


@functools.lru_cache(maxsize=None)
def _gather_tables(radius: int) -> tuple[tuple[tuple[int, int], ...], np.ndarray]:
  """The distinct path pixels U (all paths' (dy, dx), sorted) and an [N, L_max] table of indices into U
  per path, each path padded with its destination (a repeat never beats the running max, so the
  padding is inert)."""
  ps = paths(radius)
  pixels = tuple(sorted({(int(y), int(x)) for p in ps for y, x in p}))
  where = {c: i for i, c in enumerate(pixels)}
  lmax = max(len(p) for p in ps)
  rows = [[where[int(y), int(x)] for y, x in p] for p in ps]
  table = np.array([row + row[:1] * (lmax - len(row)) for row in rows], np.int32)
  table.setflags(write=False)
  return pixels, table


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _path_max(stack: jax.Array, radius: int) -> jax.Array:
  return _path_max_fwd(stack, radius)[0]


def _path_max_fwd(stack, radius):
  """[B, U, h, w] shifted edge maps -> ([B, N, h, w] max over each path, residual: the argmax position).

  A loop over path positions, each step taking N whole planes of the stack, keeps the compiled program
  small: unrolling IRN's ~2k per-pixel maxima (radius 10) as jnp.maximum ops took minutes to compile.
  The first maximum along the path wins, as in torch's max_pool2d that IRN reduces with; the backward
  pass needs only that int8 position, not one mask per step.
  """
  table = jnp.asarray(_gather_tables(radius)[1])

  def body(l, carry):
    best, arg = carry
    v = jnp.take(stack, table[:, l], axis=1)
    better = v > best
    return jnp.where(better, v, best), jnp.where(better, l.astype(jnp.int8), arg)

  first = jnp.take(stack, table[:, 0], axis=1)
  best, arg = jax.lax.fori_loop(1, table.shape[1], body, (first, jnp.zeros(first.shape, jnp.int8)))
  return best, arg


def _path_max_bwd(radius, arg, g):
  pixels, table_np = _gather_tables(radius)
  table = jnp.asarray(table_np)
  b, _, h, w = arg.shape

  def body(l, grad):
    # Duplicate indices within a column (two paths through the same pixel at position l) add up.
    return grad.at[:, table[:, l]].add(jnp.where(arg == l, g, 0.0))

  grad = jnp.zeros((b, len(pixels), h, w), g.dtype)
  return (jax.lax.fori_loop(0, table.shape[1], body, grad),)


_path_max.defvjp(_path_max_fwd, _path_max_bwd)


def edge_to_affinity(edge: jax.Array, radius: int) -> jax.Array:
  """[B, h, w] edge probabilities in [0, 1] -> [B, N, h, w] affinities 1 - max(edge along the path).

  Pairs whose destination is outside the map get exactly 0: the map is padded with 1.0 and the
  destination is on its own path. Differentiable; the gradient of the max goes to the first maximal
  pixel along the path (destination first), as in IRN's max_pool2d.
  """
  _, h, w = edge.shape
  r0 = radius - 1  # the largest |dy| and |dx| of any path pixel (IRN's radius_floor)
  padded = jnp.pad(edge, ((0, 0), (0, r0), (r0, r0)), constant_values=1.0)
  pixels, _ = _gather_tables(radius)
  # [B, U, h, w]: the map shifted by every distinct path pixel (39 for radius 5, 162 for 10).
  stack = jnp.stack([padded[:, dy : dy + h, r0 + dx : r0 + dx + w] for dy, dx in pixels], axis=1)
  return 1.0 - _path_max(stack, radius)


def _window_mask(h: int, w: int, radius: int) -> np.ndarray:
  """[h, w] bool: IRN's training-time source window (see the module docstring)."""
  r0 = radius - 1
  mask = np.zeros((h, w), bool)
  mask[: max(h - r0, 0), r0 : max(w - r0, r0)] = True
  return mask


def pair_labels(
    labels: jax.Array, radius: int, *, ignore_index: int = IGNORE_INDEX, irn_window: bool = False
) -> dict[str, jax.Array]:
  """IRN's GetAffinityLabelFromIndices on [B, h, w] integer labels (0 = background, ignore_index = unsure).

  Returns {'bg_pos', 'fg_pos', 'neg'}, each float32 [B, N, h, w] in {0, 1}. A pair is valid when both
  ends are in the map and both labels are in [0, ignore_index) (IRN: < 21); bg_pos = valid, equal and
  0; fg_pos = valid, equal and > 0; neg = valid and different. Labels above ignore_index count as
  unsure too, as IRN's `< 21` treats every non-class value.
  """
  _, h, w = labels.shape
  r0 = radius - 1
  lab = labels.astype(jnp.int32)
  lab = jnp.where((lab >= 0) & (lab < ignore_index), lab, -1)  # -1: unsure, also the out-of-map padding
  padded = jnp.pad(lab, ((0, 0), (0, r0), (r0, r0)), constant_values=-1)
  dst = jnp.stack([padded[:, dy : dy + h, r0 + dx : r0 + dx + w] for dy, dx in offsets(radius)], axis=1)
  src = lab[:, None]
  valid = (src >= 0) & (dst >= 0)
  if irn_window:
    valid &= _window_mask(h, w, radius)
  equal = src == dst
  f32 = lambda m: m.astype(jnp.float32)
  return {
      "bg_pos": f32(valid & equal & (src == 0)),
      "fg_pos": f32(valid & equal & (src > 0)),
      "neg": f32(valid & ~equal),
  }


def affinity_loss(
    edge_logits: jax.Array,
    labels: jax.Array,
    radius: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    irn_window: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """IRN's boundary loss (train_irn.py) from [B, h, w] edge logits and [B, h, w] stride-4 IR labels.

  a = edge_to_affinity(sigmoid(logits)); each term is a mean over its pairs with IRN's epsilons:
  bg = Σ bg_pos·(-log(a + 1e-5)) / (Σ bg_pos + 1e-5), fg likewise, neg with -log(1 + 1e-5 - a);
  pos = bg/2 + fg/2 and the loss is (pos + neg)/2 (IRN's total without its displacement terms).
  Returns (loss, {'bg_pos', 'fg_pos', 'pos', 'neg'}). Pairs crossing the border carry no label, so
  their affinity (0) never reaches the loss.
  """
  aff = edge_to_affinity(jax.nn.sigmoid(edge_logits.astype(jnp.float32)), radius)
  lab = pair_labels(labels, radius, ignore_index=ignore_index, irn_window=irn_window)

  def mean_over(mask, per_pair):
    return jnp.sum(mask * per_pair) / (jnp.sum(mask) + LOSS_EPS)

  pos_pair = -jnp.log(aff + LOSS_EPS)
  bg = mean_over(lab["bg_pos"], pos_pair)
  fg = mean_over(lab["fg_pos"], pos_pair)
  neg = mean_over(lab["neg"], -jnp.log(1.0 + LOSS_EPS - aff))
  pos = bg / 2 + fg / 2
  return (pos + neg) / 2, {"bg_pos": bg, "fg_pos": fg, "pos": pos, "neg": neg}
