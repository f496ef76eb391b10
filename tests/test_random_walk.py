"""IRN's pair machinery (refine/affinity.py) and random walk (refine/random_walk.py) against hand
enumerations, plain numpy loops, a float64 matrix-power reference and torch's interpolate.

The float32 walks are compared with a float64 x·T^(2^n) built from the same float32 affinities: after 8
squarings IRN's dense float32 walk drifts from it by up to ~8e-5 relative, the sparse stencil by ~1e-5,
so sparse vs dense in float32 is held to 2e-4; run in float64, the two agree to 1e-11.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cpal_jax.refine import affinity as aff
from cpal_jax.refine import random_walk as rw

edge_to_affinity = jax.jit(aff.edge_to_affinity, static_argnames=("radius",))
pair_labels = jax.jit(aff.pair_labels, static_argnames=("radius", "ignore_index", "irn_window"))
affinity_loss = jax.jit(aff.affinity_loss, static_argnames=("radius", "ignore_index", "irn_window"))
dense_affinity = jax.jit(rw.dense_affinity, static_argnames=("radius",))
transition_weights = jax.jit(rw.transition_weights, static_argnames=("radius",))


def test_offsets_radius_2_and_3_by_hand():
  # Radius 2: (0, 1), then y = 1 with x in {-1, 0, 1} (x² + 1 < 4); grouped by path length, where
  # the straight steps have 2 pixels and the diagonals 4 (their bounding box is within 1 of the line).
  assert aff.offsets(2).tolist() == [[0, 1], [1, 0], [1, -1], [1, 1]]
  # Radius 3, lengths 2, 3, 4, 6, 6, 6, 6, 7, 7 as enumerated below; search order within a length.
  assert aff.offsets(3).tolist() == [
    [0, 1], [1, 0],
    [0, 2], [2, 0],
    [1, -1], [1, 1],
    [1, -2], [1, 2], [2, -1], [2, 1],
    [2, -2], [2, 2],
  ]  # fmt: skip
  path = {tuple(o): {tuple(c) for c in p} for o, p in zip(aff.offsets(3).tolist(), aff.paths(3))}
  assert path[0, 2] == {(0, 0), (0, 1), (0, 2)}
  assert path[1, 1] == {(0, 0), (0, 1), (1, 0), (1, 1)}
  # (2, 1): |2x - y| <= 2 holds on the whole 3x2 box.
  assert path[2, 1] == {(y, x) for y in range(3) for x in range(2)}
  # (2, -2): |x + y| <= 1, i.e. the box minus its two far corners.
  assert path[2, -2] == {(0, 0), (0, -1), (1, 0), (1, -1), (1, -2), (2, -1), (2, -2)}
  for o, p in zip(aff.offsets(3), aff.paths(3)):
    assert tuple(p[0]) == tuple(o)  # destination first, as IRN's path_dst = p[:, 0]


@pytest.mark.parametrize("radius, count", [(2, 4), (3, 12), (5, 34), (10, 152)])
def test_offsets_are_half_of_the_open_disc(radius, count):
  off = aff.offsets(radius)
  assert len(off) == count
  half = {tuple(o) for o in off.tolist()}
  full = half | {(-y, -x) for y, x in half}
  disc = {
      (y, x)
      for y in range(-radius, radius + 1)
      for x in range(-radius, radius + 1)
      if 0 < y * y + x * x < radius**2
  }
  assert len(half) == count and len(full) == 2 * count and full == disc
  lengths = [len(p) for p in aff.paths(radius)]
  assert lengths == sorted(lengths)
  for o, p in zip(off, aff.paths(radius)):
    dy, dx = o
    # Every path pixel lies in the segment's bounding box within distance < 1 of the line.
    assert all(min(0, dy) <= y <= max(0, dy) and min(0, dx) <= x <= max(0, dx) for y, x in p)
    assert all((dy * x - dx * y) ** 2 < dy * dy + dx * dx for y, x in p)
    assert (0, 0) in {tuple(c) for c in p} and len({tuple(c) for c in p}) == len(p)


def np_edge_to_affinity(edge, radius):
  b, h, w = edge.shape
  out = np.zeros((b, len(aff.offsets(radius)), h, w), np.float32)
  for n, p in enumerate(aff.paths(radius)):
    dy, dx = p[0]
    for y in range(h):
      for x in range(w):
        if 0 <= y + dy < h and 0 <= x + dx < w:
          out[:, n, y, x] = 1.0 - np.max([edge[:, y + py, x + px] for py, px in p], axis=0)
  return out


@pytest.mark.parametrize("radius", [3, 5])
def test_edge_to_affinity_matches_loop(radius):
  edge = np.random.default_rng(0).random((2, 7, 9)).astype(np.float32)
  got = np.asarray(edge_to_affinity(edge, radius))
  np.testing.assert_array_equal(got, np_edge_to_affinity(edge, radius))


def np_pair_labels(labels, radius, irn_window=False):
  b, h, w = labels.shape
  r0 = radius - 1
  out = {k: np.zeros((b, len(aff.offsets(radius)), h, w), np.float32) for k in ("bg_pos", "fg_pos", "neg")}
  for n, (dy, dx) in enumerate(aff.offsets(radius)):
    for y in range(h):
      for x in range(w):
        if not (0 <= y + dy < h and 0 <= x + dx < w):
          continue
        if irn_window and not (y < h - r0 and r0 <= x < w - r0):
          continue
        for i in range(b):
          a, c = int(labels[i, y, x]), int(labels[i, y + dy, x + dx])
          if a == 255 or c == 255:
            continue
          key = "neg" if a != c else ("bg_pos" if a == 0 else "fg_pos")
          out[key][i, n, y, x] = 1.0
  return out


@pytest.mark.parametrize("irn_window", [False, True])
def test_pair_labels_matches_loop(irn_window):
  rng = np.random.default_rng(1)
  labels = rng.choice(np.array([0, 0, 3, 7, 255], np.uint8), size=(2, 8, 11))
  got = pair_labels(labels, 4, irn_window=irn_window)
  want = np_pair_labels(labels, 4, irn_window)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
  total = sum(want.values())
  assert total.max() == 1.0  # the three classes are disjoint
  ignored = labels[:, None] == 255
  assert not np.any(total * ignored)  # no pair starts on an ignored pixel


def test_irn_window_is_irn_source_set():
  # IRN's training PathIndex (no padding): sources at rows < h - r0, columns r0 .. w - r0 - 1.
  h, w, radius = 9, 12, 4
  r0 = radius - 1
  got = np.asarray(pair_labels(np.zeros((1, h, w), np.int32), radius, irn_window=True)["bg_pos"])[0]
  want = np.zeros_like(got)
  want[:, : h - r0, r0 : w - r0] = 1.0
  np.testing.assert_array_equal(got, want)


def np_affinity_loss(logits, labels, radius):
  a = np_edge_to_affinity(1.0 / (1.0 + np.exp(-logits.astype(np.float64))), radius).astype(np.float64)
  lab = np_pair_labels(labels, radius)
  term = lambda m, v: np.sum(m * v) / (np.sum(m) + 1e-5)
  bg = term(lab["bg_pos"], -np.log(a + 1e-5))
  fg = term(lab["fg_pos"], -np.log(a + 1e-5))
  neg = term(lab["neg"], -np.log(1 + 1e-5 - a))
  return (bg / 2 + fg / 2 + neg) / 2, dict(bg_pos=bg, fg_pos=fg, neg=neg)


def two_region_labels(b=2, h=10, w=12):
  labels = np.zeros((b, h, w), np.uint8)
  labels[:, :, w // 2 :] = 5
  labels[:, 0, :3] = 255
  return labels


def test_affinity_loss_matches_numpy_and_has_gradient():
  labels = two_region_labels()
  logits = np.random.default_rng(2).normal(size=labels.shape).astype(np.float32)
  loss, terms = affinity_loss(logits, labels, 3)
  want, want_terms = np_affinity_loss(logits, labels, 3)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  for k, v in want_terms.items():
    np.testing.assert_allclose(float(terms[k]), v, rtol=1e-5, err_msg=k)
  grad = jax.grad(lambda e: affinity_loss(e, labels, 3)[0])(jnp.asarray(logits))
  assert np.all(np.isfinite(grad)) and np.abs(np.asarray(grad)).sum() > 0


def test_custom_gradient_matches_autodiff_of_jnp_max():
  # Continuous random logits: no ties, so jnp.max's gradient is unique and must equal the custom
  # first-argmax rule.
  labels = two_region_labels(h=8, w=9)
  logits = jnp.asarray(np.random.default_rng(3).normal(size=labels.shape).astype(np.float32))
  radius = 3

  def ref_affinity(edge):
    _, h, w = edge.shape
    r0 = radius - 1
    pad = jnp.pad(edge, ((0, 0), (0, r0), (r0, r0)), constant_values=1.0)
    chans = [
        jnp.max(jnp.stack([pad[:, y : y + h, r0 + x : r0 + x + w] for y, x in p]), axis=0)
        for p in aff.paths(radius)
    ]
    return 1.0 - jnp.stack(chans, axis=1)

  def loss_with(e2a, lg):
    a = e2a(jax.nn.sigmoid(lg))
    lab = aff.pair_labels(labels, radius)
    return jnp.sum(lab["bg_pos"] * jnp.log(a + 1e-5) + 0.3 * lab["neg"] * jnp.log(1 + 1e-5 - a))

  got = jax.jit(jax.grad(functools.partial(loss_with, lambda e: aff.edge_to_affinity(e, radius))))(logits)
  want = jax.jit(jax.grad(functools.partial(loss_with, ref_affinity)))(logits)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_true_boundary_beats_misplaced_edges():
  labels = two_region_labels()
  w = labels.shape[2]
  # One edge column, the first of the class-5 side: every path between the classes crosses it.
  good = np.full(labels.shape, -6.0, np.float32)
  good[:, :, w // 2] = 6.0
  rng = np.random.default_rng(4)
  shuffled = np.stack([rng.permutation(g.ravel()).reshape(g.shape) for g in good])  # same edge pixels
  noise = rng.normal(scale=3.0, size=labels.shape).astype(np.float32)
  none = np.full(labels.shape, -6.0, np.float32)
  loss, terms = affinity_loss(good, labels, 3)
  assert float(terms["neg"]) < 0.01 and float(terms["bg_pos"]) < 0.01  # measured 0.0025 each
  for other in (shuffled, noise, none):  # measured 2.46, 1.84, 3.00 against 0.32
    assert float(loss) < 0.5 * float(affinity_loss(other, labels, 3)[0])


def f64_walk(cams, edge, beta, exp_times, radius):
  """x·T^(2^n) in float64 from IRN's dense float32 affinities."""
  k, h, w = cams.shape
  mat = np.asarray(dense_affinity(edge, radius), np.float64) ** beta
  trans = mat / mat.sum(axis=0, keepdims=True)
  x = (cams.astype(np.float64) * (1.0 - edge.astype(np.float64))).reshape(k, -1)
  return (x @ np.linalg.matrix_power(trans, 2**exp_times)).reshape(k, h, w)


def test_dense_affinity_matches_loop():
  edge = np.random.default_rng(5).random((6, 7)).astype(np.float32)
  h, w = edge.shape
  pair = np_edge_to_affinity(edge[None], 3)[0]
  want = np.eye(h * w, dtype=np.float32)
  for n, (dy, dx) in enumerate(aff.offsets(3)):
    for y in range(h):
      for x in range(w):
        if 0 <= y + dy < h and 0 <= x + dx < w:
          i, j = y * w + x, (y + dy) * w + x + dx
          want[i, j] = want[j, i] = pair[n, y, x]
  np.testing.assert_array_equal(np.asarray(dense_affinity(edge, 3)), want)


@pytest.mark.parametrize("exp_times", [3, 8])
def test_sparse_walk_equals_dense(exp_times):
  rng = np.random.default_rng(6)
  cams = rng.random((3, 12, 15)).astype(np.float32)
  edge = (rng.random((12, 15)) ** 3).astype(np.float32)
  sparse = np.asarray(rw.random_walk(cams, edge, beta=10, exp_times=exp_times, radius=5))
  dense = np.asarray(rw.random_walk_dense(cams, edge, beta=10, exp_times=exp_times, radius=5))
  ref = f64_walk(cams, edge, 10, exp_times, 5)
  # Measured max relative errors vs float64: sparse 5e-7 / 1e-5, dense 3e-6 / 8e-5 (exp_times 3 / 8).
  np.testing.assert_allclose(sparse, ref, rtol=3e-5 if exp_times == 8 else 5e-6)
  np.testing.assert_allclose(dense, ref, rtol=2e-4 if exp_times == 8 else 1e-5)
  np.testing.assert_allclose(sparse, dense, rtol=2e-4 if exp_times == 8 else 1e-5)


def test_sparse_walk_equals_dense_in_float64():
  # Same algorithm, different association: in float64 the two agree to rounding, 256 steps vs 8 squarings.
  rng = np.random.default_rng(9)
  cams = rng.random((2, 9, 11))
  edge = rng.random((9, 11)) ** 3
  with jax.enable_x64(True):
    sparse = np.asarray(rw.random_walk(cams, edge, beta=10, exp_times=8, radius=5))
    dense = np.asarray(rw.random_walk_dense(cams, edge, beta=10, exp_times=8, radius=5))
  assert sparse.dtype == dense.dtype == np.float64
  np.testing.assert_allclose(sparse, dense, rtol=1e-11)


def test_transition_columns_are_stochastic():
  edge = np.random.default_rng(7).random((9, 10)).astype(np.float32)
  weights = np.asarray(transition_weights(edge, 10.0, 5))
  np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=3e-6)
  mat = np.asarray(dense_affinity(edge, 5), np.float64) ** 10
  trans = mat / mat.sum(axis=0, keepdims=True)
  h, w = edge.shape
  for s, (dy, dx) in enumerate(rw.stencil(5)):  # P[s, j] = T[j + o_s, j]
    for y, x in [(0, 0), (4, 5), (8, 9), (2, 8)]:
      inside = 0 <= y + dy < h and 0 <= x + dx < w
      want = trans[(y + dy) * w + x + dx, y * w + x] if inside else 0.0
      np.testing.assert_allclose(weights[s, y, x], want, rtol=1e-5, atol=1e-12)


def test_closed_edge_contains_the_walk():
  h, w = 20, 24
  edge = np.zeros((h, w), np.float32)
  edge[4, 4:12] = edge[11, 4:12] = edge[4:12, 4] = edge[4:12, 11] = 0.9  # a closed ring
  inside = np.zeros((h, w), bool)
  inside[5:11, 5:11] = True
  cams = np.zeros((1, h, w), np.float32)
  cams[0, 7, 7] = 1.0
  out = np.asarray(rw.random_walk(cams, edge, beta=10, exp_times=8, radius=5))[0]
  assert out[inside].sum() > 0 and out[~inside].sum() < 1e-6 * out[inside].sum()
  # The walk spreads within the ring (averaging: the seed becomes a near-uniform plateau) ...
  assert out[inside].min() > 0.5 * out[inside].max()
  # ... and without the ring it leaves the box.
  free = np.asarray(rw.random_walk(cams, np.zeros_like(edge), beta=10, exp_times=8, radius=5))[0]
  assert free[~inside].sum() > free[inside].sum()


def test_to_mask_scores_matches_torch():
  scores = np.random.default_rng(8).random((3, 10, 12)).astype(np.float32)
  out_hw = (37, 45)
  got = np.asarray(rw.to_mask_scores(jnp.asarray(scores), out_hw))
  up = torch.nn.functional.interpolate(
      torch.from_numpy(scores)[:, None], scale_factor=4, mode="bilinear", align_corners=False
  )
  up = up[..., 0, : out_hw[0], : out_hw[1]]
  want = (up / torch.max(up)).numpy()
  assert got.shape == (3, *out_hw)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
