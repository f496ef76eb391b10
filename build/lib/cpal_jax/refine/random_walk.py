"""IRN's random walk (docs/method.md 1.5 D4, IRN's `indexing.propagate_to_edge` and `make_sem_seg_labels`),
computed on the sparse radius stencil instead of IRN's dense h·w × h·w transition matrix.

IRN's convention, reproduced exactly:
- A[i, j] = a(i, j)^β for pixel pairs within the radius-5 half-disc in either direction, with
  a = 1 - max edge along the line (affinity.edge_to_affinity); A[i, i] = 1; pairs with an end outside
  the map are absent. (IRN pads the edge map with 1.0 on the left, right and bottom before indexing and
  then crops the padded rows and columns out of A; a pair with both ends in the map never reads the
  padding, so the padding only decides which pairs exist.)
- T = A / Σ_i A[i, j]: each *column* sums to 1, i.e. every destination j is normalised over its
  sources i (torch.sum(dim=0)). A is symmetric, so the column sum is also the row sum D[j].
- rw = (cam ⊙ (1 - edge)) · T^(2^exp_times), a row vector per class times the matrix: each step
  replaces x[j] by the A-weighted average of x over j's neighbourhood, Σ_i x[i] A[i, j] / D[j]. A constant map
  stays constant; the total mass is not conserved.

IRN squares T `exp_times` times (8 dense 12k × 12k matmuls for a VOC image, ~26 TFLOP and 0.55 GB per
copy). Applying the same one-step operator 2^exp_times times to the K class maps costs
O(K · pixels · neighbours) per step (69 stencil entries at radius 5, centre included) and O(pixels · neighbours) memory; the
result is x·T^(2^n) either way, equal up to float rounding (see `_step` for the float32 form).
`random_walk_dense` is IRN's matrix path, kept as the reference for tests and the benchmark.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cpal_jax.image_ops import resize_bilinear
from cpal_jax.refine import affinity

_HI = jax.lax.Precision.HIGHEST


def _float_dtype(*xs) -> jnp.dtype:
  # float32 at least (bf16/int inputs), float64 when x64 is on and an input is float64 (tests).
  return jnp.result_type(jnp.float32, *(x.dtype for x in xs))


def stencil(radius: int) -> np.ndarray:
  """[2N + 1, 2] (dy, dx): the centre, IRN's half-disc directions, then their reverses."""
  half = affinity.offsets(radius)
  return np.concatenate([np.zeros((1, 2), half.dtype), half, -half])


def transition_weights(edge: jax.Array, beta: float, radius: int) -> jax.Array:
  """[S, h, w] one-step weights P[s, j] = A[j + o_s, j] / D[j] for o_s = stencil(radius)[s]; 0 where
  j + o_s is outside the map. Σ_s P[s, j] = 1 (the columns of IRN's T)."""
  h, w = edge.shape
  r0 = radius - 1
  fwd = affinity.edge_to_affinity(edge[None], radius)[0] ** beta  # [N, h, w]: A[j + d, j] at source j
  # Reverse direction -d at j is the pair (j - d, j), stored at source j - d: shift fwd by +d. Zero
  # padding covers sources outside the map.
  fwd_pad = jnp.pad(fwd, ((0, 0), (r0, r0), (r0, r0)))
  bwd = jnp.stack(
      [
          fwd_pad[n, r0 - dy : r0 - dy + h, r0 - dx : r0 - dx + w]
          for n, (dy, dx) in enumerate(affinity.offsets(radius))
      ]
  )
  weights = jnp.concatenate([jnp.ones((1, h, w), fwd.dtype), fwd, bwd])
  return weights / jnp.sum(weights, axis=0, keepdims=True)  # the sum is >= 1: the unit diagonal


def _step(x: jax.Array, weights: jax.Array, radius: int) -> jax.Array:
  """x · T for [K, h, w] maps: x'[j] = Σ_s P[s, j] · x[j + o_s], evaluated as
  x[j] + Σ_{s != 0} P[s, j] · (x[j + o_s] - x[j]), equal since Σ_s P[s, j] = 1.

  In float32 the weights sum to 1 only to ~1e-7, and the plain sum compounds that over 256 steps into
  a ~3e-4 relative drift from the float64 walk; the difference form keeps a constant map exactly
  constant and stays within ~1e-5 (IRN's dense float32 squaring: up to ~8e-5; see the tests).
  """
  _, h, w = x.shape
  r0 = radius - 1
  padded = jnp.pad(x, ((0, 0), (r0, r0), (r0, r0)))  # zeros meet zero weights
  delta = jnp.zeros_like(x)
  for s, (dy, dx) in enumerate(stencil(radius)[1:], start=1):
    delta = delta + weights[s] * (padded[:, r0 + dy : r0 + dy + h, r0 + dx : r0 + dx + w] - x)
  return x + delta


@functools.partial(jax.jit, static_argnames=("exp_times", "radius"))
def random_walk(
    cams: jax.Array, edge: jax.Array, *, beta: float = 10, exp_times: int = 8, radius: int = 5
) -> jax.Array:
  """IRN's propagate_to_edge on the sparse stencil: [K, h, w] stride-4 CAMs and [h, w] edge
  probabilities -> [K, h, w] = (cams ⊙ (1 - edge)) · T^(2^exp_times), applied as 2^exp_times steps."""
  dtype = _float_dtype(cams, edge)
  cams, edge = cams.astype(dtype), edge.astype(dtype)
  weights = transition_weights(edge, beta, radius)
  x = cams * (1.0 - edge)
  return jax.lax.fori_loop(0, 2**exp_times, lambda _, x: _step(x, weights, radius), x)


def dense_affinity(edge: jax.Array, radius: int) -> jax.Array:
  """[h·w, h·w] IRN's dense affinity matrix (symmetric, unit diagonal, row-major pixel order)."""
  h, w = edge.shape
  aff = affinity.edge_to_affinity(edge[None], radius)[0]
  ys, xs = np.mgrid[:h, :w]
  src, dst, vals = [], [], []
  for n, (dy, dx) in enumerate(affinity.offsets(radius)):
    inside = (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
    src.append((ys * w + xs)[inside])
    dst.append(((ys + dy) * w + xs + dx)[inside])
    vals.append(aff[n][inside])
  src, dst, vals = np.concatenate(src), np.concatenate(dst), jnp.concatenate(vals)
  diag = np.arange(h * w)
  mat = jnp.zeros((h * w, h * w), aff.dtype).at[src, dst].set(vals).at[dst, src].set(vals)
  return mat.at[diag, diag].set(1.0)


@functools.partial(jax.jit, static_argnames=("radius",))
def dense_transition(edge: jax.Array, beta: float, radius: int) -> jax.Array:
  """IRN's to_transition_matrix before the squaring: [h·w, h·w] A^β normalised over each column."""
  mat = dense_affinity(edge.astype(_float_dtype(edge)), radius) ** beta
  return mat / jnp.sum(mat, axis=0, keepdims=True)


@functools.partial(jax.jit, static_argnames=("exp_times",))
def dense_propagate(cams: jax.Array, edge: jax.Array, trans: jax.Array, exp_times: int) -> jax.Array:
  """(cams ⊙ (1 - edge)) · trans^(2^exp_times) by `exp_times` squarings, as IRN."""
  k, h, w = cams.shape
  for _ in range(exp_times):
    trans = jnp.matmul(trans, trans, precision=_HI)
  x = (cams * (1.0 - edge)).reshape(k, h * w).astype(trans.dtype)
  return jnp.matmul(x, trans, precision=_HI).reshape(k, h, w)


def random_walk_dense(
    cams: jax.Array, edge: jax.Array, *, beta: float = 10, exp_times: int = 8, radius: int = 5
) -> jax.Array:
  """IRN's dense propagate_to_edge, for tests and benchmarks: O((h·w)²) memory, O((h·w)³) time.

  Two jitted programs, like IRN's eager torch calls: in a single XLA:CPU program the power and the
  column normalisation fuse into the first matmul (a YNNPACK dot fusion, optimization_barrier or
  not), which made it 4x slower than the plain matmul at 5808 pixels.
  """
  dtype = _float_dtype(cams, edge)
  cams, edge = cams.astype(dtype), edge.astype(dtype)
  return dense_propagate(cams, edge, dense_transition(edge, beta, radius), exp_times)


def to_mask_scores(rw: jax.Array, out_hw: tuple[int, int], *, scale: int = 4) -> jax.Array:
  """IRN's post-processing of the walk: [K, h, w] -> [K, H, W] upsampled ×scale (bilinear,
  align_corners=False), cropped to out_hw = (H, W) and divided by the global max over all classes
  and pixels (no epsilon, as IRN; the walk of a present class is positive somewhere)."""
  _, h, w = rw.shape
  up = resize_bilinear(jnp.transpose(rw, (1, 2, 0))[None], (h * scale, w * scale))[0]
  up = jnp.transpose(up, (2, 0, 1))[:, : out_hw[0], : out_hw[1]]
  return up / jnp.max(up)
