"""Masked k-means against scikit-learn's Lloyd (same initial centres) and a float64 numpy reference.

Both relocate an empty cluster to the point farthest from its centre (scikit-learn's rule). Both stop
once an iteration changes no label (tol=0: strict convergence), and our n_iter counts
iterations as scikit-learn's `n_iter_` does (the final no-change iteration included): equal exactly.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sklearn.cluster import KMeans

from cpal_jax.method import kmeans as km

CAP, DIM, C, ITERS = 128, 6, 5, 20
STATIC = ("num_clusters", "iters", "init", "metric", "fixed_iters")
kmeans = jax.jit(km.kmeans, static_argnames=STATIC)
init_centers = jax.jit(km.init_centers, static_argnames=("num_clusters", "init", "metric"))
lloyd = jax.jit(km.lloyd, static_argnames=("iters", "metric", "fixed_iters"))
assign = jax.jit(km.assign, static_argnames=("metric",))


def ring(real, garbage=1e30):
  """A CAP-slot buffer holding `real` in its first slots and huge values after them."""
  out = np.full((CAP, real.shape[1]), garbage, np.float32)
  out[: len(real)] = real
  return out


def separated(rng, n):
  means = rng.normal(size=(C, DIM)) * 20.0
  return (means[rng.integers(0, C, n)] + rng.normal(size=(n, DIM))).astype(np.float32)


def np_lloyd(x, centers, iters, cosine=False):
  """Reference Lloyd in float64, ties to the lowest index. An empty cluster takes the point farthest
  from its centre (the j-th empty cluster the j-th farthest point), as scikit-learn relocates them."""
  x = np.asarray(x, np.float64)
  c = np.array(centers, np.float64)
  if cosine:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)

  def labels(c):
    if cosine:
      return np.argmax(x @ c.T, axis=1)
    return np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)

  for _ in range(iters):
    lab = labels(c)
    dist = ((x - c[lab]) ** 2).sum(-1)
    empty = [j for j in range(len(c)) if not (lab == j).any()]
    far = np.argsort(-dist, kind="stable")[: len(empty)]
    lab = lab.copy()
    lab[far] = empty
    for j in range(len(c)):
      if (lab == j).any():
        c[j] = x[lab == j].mean(0)
        if cosine:
          c[j] /= np.linalg.norm(c[j])
  return c, labels(c)


@pytest.mark.parametrize("data", ["separated", "random"])
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_matches_sklearn(data, init):
  rng = np.random.default_rng(0 if data == "separated" else 3)
  count = 100
  real = separated(rng, count) if data == "separated" else rng.normal(size=(count, DIM)).astype(np.float32)
  points = ring(real)  # slots >= count hold 1e30: must be ignored
  key = jax.random.key(7)

  c0 = np.asarray(init_centers(points, count, C, key, init))
  ours = np.asarray(lloyd(points, count, c0, ITERS)[0])
  ref = KMeans(C, init=c0.astype(np.float64), n_init=1, max_iter=ITERS, tol=0, algorithm="lloyd")
  ref.fit(real.astype(np.float64))
  np.testing.assert_allclose(ours, ref.cluster_centers_, atol=1e-4)
  # Same stopping rule, same iteration count (scikit-learn's n_iter_ includes the no-change iteration).
  counted, n_iter = lloyd(points, count, c0, ITERS)
  np.testing.assert_array_equal(np.asarray(counted), ours)
  assert int(n_iter) == ref.n_iter_
  labels = np.asarray(assign(points, count, ours))
  np.testing.assert_array_equal(labels[:count], ref.labels_)
  assert (labels[count:] == -1).all()

  # The all-in-one entry point draws the same init from the same key.
  centers, sizes, valid, _ = kmeans(points, count, C, key, iters=ITERS, init=init)
  np.testing.assert_allclose(np.asarray(centers), ref.cluster_centers_, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(sizes), np.bincount(ref.labels_, minlength=C))
  assert np.asarray(valid).all()


def test_garbage_slots_do_not_change_the_result():
  rng = np.random.default_rng(1)
  real = separated(rng, 90)
  key = jax.random.key(0)
  clean = kmeans(ring(real, 0.0), 90, C, key, iters=ITERS)
  dirty = kmeans(ring(real, np.nan), 90, C, key, iters=ITERS)
  for a, b in zip(clean, dirty):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_empty_cluster_takes_the_farthest_point_as_sklearn_does():
  rng = np.random.default_rng(2)
  real = rng.normal(size=(60, DIM)).astype(np.float32)
  c0 = real[:C].copy()
  c0[3] = 1000.0  # nearest to no point at first
  c0[4] = c0[0]  # exact duplicate: loses every tie to centre 0 at first
  centers, sizes, valid, _ = kmeans(ring(real), 60, C, None, iters=ITERS, prev_centers=c0)
  centers = np.asarray(centers)
  assert (np.asarray(sizes) > 0).all() and np.asarray(valid).all()
  ref = KMeans(C, init=c0.astype(np.float64), n_init=1, max_iter=ITERS, tol=0, algorithm="lloyd")
  ref.fit(real.astype(np.float64))
  np.testing.assert_allclose(centers, ref.cluster_centers_, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(assign(ring(real), 60, centers))[:60], ref.labels_)
  ref_centers, ref_labels = np_lloyd(real, c0, ITERS)
  np.testing.assert_allclose(centers, ref_centers, atol=1e-4)


def test_several_empty_clusters_pair_with_the_farthest_points_in_order():
  rng = np.random.default_rng(22)
  real = rng.normal(size=(80, DIM)).astype(np.float32)
  c0 = real[:C].copy()
  c0[1], c0[3] = 1000.0, -1000.0  # two clusters nearest to no point
  centers, sizes, _, _ = kmeans(ring(real), 80, C, None, iters=ITERS, prev_centers=c0)
  ref_centers, ref_labels = np_lloyd(real, c0, ITERS)
  np.testing.assert_allclose(np.asarray(centers), ref_centers, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(sizes), np.bincount(ref_labels, minlength=C))
  assert (np.asarray(sizes) > 0).all()
  # scikit-learn pairs the same points with the same clusters up to argpartition's order: compare the
  # set of centres.
  ref = KMeans(C, init=c0.astype(np.float64), n_init=1, max_iter=ITERS, tol=0, algorithm="lloyd").fit(real)
  key = lambda c: np.lexsort(np.round(np.asarray(c), 3).T)
  np.testing.assert_allclose(
      np.asarray(centers)[key(centers)], ref.cluster_centers_[key(ref.cluster_centers_)], atol=1e-4
  )


def test_fewer_points_than_clusters():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(3, DIM)).astype(np.float32)
  centers, sizes, valid, _ = kmeans(ring(real), 3, C, jax.random.key(0), iters=ITERS)
  np.testing.assert_array_equal(np.asarray(valid), [True] * 3 + [False] * (C - 3))
  np.testing.assert_array_equal(np.asarray(centers)[:3], real)
  np.testing.assert_array_equal(np.asarray(centers)[3:], 0.0)
  np.testing.assert_array_equal(np.asarray(sizes), [1, 1, 1, 0, 0])


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_empty_bank_is_all_invalid_and_finite(init):
  for garbage in (1e30, np.nan):
    points = ring(np.zeros((0, DIM), np.float32), garbage)
    centers, sizes, valid, _ = kmeans(points, 0, C, jax.random.key(0), iters=ITERS, init=init)
    assert not np.asarray(valid).any()
    assert np.isfinite(np.asarray(centers)).all()
    assert not np.asarray(sizes).any()


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_init_picks_distinct_valid_points_deterministically(init):
  rng = np.random.default_rng(4)
  count = 40
  real = rng.normal(size=(count, DIM)).astype(np.float32)
  points = ring(real, 7.0)
  c_a = np.asarray(init_centers(points, count, C, jax.random.key(1), init))
  c_b = np.asarray(init_centers(points, count, C, jax.random.key(1), init))
  c_other = np.asarray(init_centers(points, count, C, jax.random.key(2), init))
  np.testing.assert_array_equal(c_a, c_b)
  assert not np.array_equal(c_a, c_other)
  # Every centre is one of the real points, and no point is picked twice.
  match = (c_a[:, None, :] == real[None]).all(-1)
  assert (match.sum(1) == 1).all() and len(set(match.argmax(1))) == C


def test_kmeanspp_samples_by_squared_distance():
  # One far outlier among 63 tight points: D^2 sampling picks it as one of two centres nearly always,
  # uniform sampling almost never (2/64).
  rng = np.random.default_rng(5)
  real = rng.normal(size=(64, DIM)).astype(np.float32) * 0.01
  real[17] = 100.0
  keys = jax.random.split(jax.random.key(0), 32)
  picks = jax.jit(jax.vmap(lambda k: km.init_centers(real, 64, 2, k)))(keys)
  has_outlier = (np.asarray(picks) == 100.0).all(-1).any(-1)
  assert has_outlier.all()


def test_cosine_is_spherical_kmeans():
  rng = np.random.default_rng(6)
  count = 100
  real = separated(rng, count) + 3.0  # off-centre, so that cosine and Euclidean clusters differ
  key = jax.random.key(3)
  c0 = np.asarray(init_centers(ring(real), count, C, key, metric="cosine"))
  np.testing.assert_allclose(np.linalg.norm(c0, axis=1), 1.0, atol=1e-6)
  centers, sizes, valid, _ = kmeans(ring(real), count, C, key, iters=ITERS, metric="cosine")
  centers = np.asarray(centers)
  np.testing.assert_allclose(np.linalg.norm(centers, axis=1), 1.0, atol=1e-6)
  ref, ref_labels = np_lloyd(real, c0, ITERS, cosine=True)
  np.testing.assert_allclose(centers, ref, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(sizes), np.bincount(ref_labels, minlength=C))
  np.testing.assert_array_equal(np.asarray(assign(ring(real), count, centers, "cosine"))[:count], ref_labels)


def test_bad_arguments():
  with pytest.raises(ValueError, match="metric"):
    km.kmeans(np.zeros((4, 2)), 4, 2, jax.random.key(0), metric="manhattan")
  with pytest.raises(ValueError, match="init"):
    km.kmeans(np.zeros((4, 2)), 4, 2, jax.random.key(0), init="forgy")


def bank_of(rng, k, cap):
  feats = rng.normal(size=(k, cap, DIM)).astype(np.float32) * 3
  count = rng.integers(0, cap + 1, k).astype(np.int32)
  count[:3] = [0, 2, cap]  # empty, fewer than C, full
  for i, n in enumerate(count):
    feats[i, n:] = 1e30
  return feats, count


def test_kmeans_bank_is_per_class_kmeans():
  feats, count = bank_of(np.random.default_rng(8), 6, CAP)
  key = jax.random.key(9)
  centers, sizes, valid, _ = km.kmeans_bank(feats, count, C, key, iters=ITERS)
  assert centers.shape == (6, C, DIM) and sizes.shape == valid.shape == (6, C)
  assert np.isfinite(np.asarray(centers)).all()
  for k in range(6):
    one = kmeans(feats[k], int(count[k]), C, jax.random.fold_in(key, k), iters=ITERS)
    for a, b in zip((centers[k], sizes[k], valid[k]), one[:3]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_sharded_kmeans_bank_matches_unsharded(init):
  if jax.device_count() < 8:  # 24 padded classes over 8 devices, 3 each, as asserted below
    pytest.skip(
        f"needs 8 devices, has {jax.device_count()}: tests/conftest.py sets "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 unless XLA_FLAGS is already set"
    )
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  feats, count = bank_of(np.random.default_rng(10), 24, 32)  # 20 classes padded to 24
  count[20:] = 0
  key = jax.random.key(11)
  run = functools.partial(km.kmeans_bank, num_clusters=C, iters=ITERS, init=init)
  plain = run(feats, count, key=key)
  f = jax.jit(
      lambda x, n, k: run(x, n, key=k), in_shardings=(sharded, sharded, replicated), out_shardings=sharded
  )
  # Each device clusters its own three classes. The only thing that crosses devices is the batched
  # while loop's condition ("is any class not converged yet"): a scalar all-reduce, never the bank.
  compiled = f.lower(feats, count, key).compile()
  hlo = compiled.as_text()
  assert not re.search(r"all-gather|all-to-all|collective-permute|reduce-scatter", hlo)
  all_reduces = [line for line in hlo.splitlines() if re.search(r"= \S+ all-reduce(-start)?\(", line)]
  assert all(re.search(r"= pred\[\] all-reduce", line) for line in all_reduces), all_reduces
  out = compiled(jax.device_put(feats, sharded), jax.device_put(count, sharded), key)
  assert out[0].addressable_shards[0].data.shape == (3, C, DIM)
  for a, b in zip(out, plain):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert not np.asarray(out[2][20:]).any()


def fixed_lloyd(points, mask, centers, iters, metric):
  """The previous implementation: exactly `iters` Lloyd iterations in a fori_loop, no early stop."""

  def step(_, centers):
    labels, dist = km._nearest(points, mask, centers, metric, km._sq_norms(points, metric))
    return km._update(points, mask, labels, dist, centers, metric)

  return jax.lax.fori_loop(0, iters, step, centers)


@functools.partial(jax.jit, static_argnames=("num_clusters", "iters", "metric"))
def fixed_kmeans(points, count, num_clusters, key, c0, iters, metric):
  points, mask = km._prepare(points, count, metric)
  centers = fixed_lloyd(points, mask, km._prepare_centers(c0, metric), iters, metric)
  labels = km._assign(points, mask, centers, metric)
  return centers, jnp.sum(labels[:, None] == jnp.arange(num_clusters)[None, :], axis=0, dtype=jnp.int32)


FIXED = 30


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("data", ["separated", "random", "empty_cluster"])
def test_early_stop_equals_fixed_iterations(data, metric):
  rng = np.random.default_rng(12)
  count = 100
  real = separated(rng, count) if data == "separated" else rng.normal(size=(count, DIM)).astype(np.float32)
  if data == "empty_cluster":
    real += 5.0  # every point in one cone around (1, ..., 1): centre 3, opposite, is nearest to none
    # at first and takes the farthest point
  points = ring(real)
  key = jax.random.key(13)
  c0 = np.array(init_centers(points, count, C, key, metric=metric))
  if data == "empty_cluster":
    c0[3] = -1000.0 if metric == "euclidean" else -1.0 / np.sqrt(DIM)

  early = kmeans(points, count, C, None, iters=FIXED, metric=metric, prev_centers=c0)
  fixed = kmeans(
      points, count, C, None, iters=FIXED, metric=metric, prev_centers=c0, fixed_iters=True
  )
  for a, b in zip(early, fixed):  # including n_iter
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(early[3]) < FIXED  # these all converge well before 30
  if data == "empty_cluster":
    assert int(early[1][3]) > 0

  # And against the old fixed 30-iteration fori loop, from the same init.
  ref_centers, ref_sizes = fixed_kmeans(points, count, C, None, c0, FIXED, metric)
  np.testing.assert_array_equal(np.asarray(early[0]), np.asarray(ref_centers))
  np.testing.assert_array_equal(np.asarray(early[1]), np.asarray(ref_sizes))
  np.testing.assert_array_equal(np.asarray(lloyd(points, count, c0, FIXED, metric)[0]), np.asarray(ref_centers))


def test_stops_early_on_separated_data():
  rng = np.random.default_rng(14)
  real = separated(rng, 120)
  key = jax.random.key(15)
  c0 = np.asarray(init_centers(ring(real), 120, C, key))
  _, n_iter = lloyd(ring(real), 120, c0, ITERS)
  assert 2 <= int(n_iter) < ITERS // 2  # at least one update plus the no-change iteration
  _, n_fixed = lloyd(ring(real), 120, c0, ITERS, fixed_iters=True)
  assert int(n_fixed) == int(n_iter)
  # A budget smaller than what convergence needs is respected, and counted like scikit-learn does.
  _, n_one = lloyd(ring(real), 120, c0, 1)
  ref = KMeans(C, init=c0.astype(np.float64), n_init=1, max_iter=1, tol=0, algorithm="lloyd").fit(real)
  assert int(n_one) == ref.n_iter_ == 1


@pytest.mark.parametrize("warm", [False, True])
def test_kmeans_bank_early_stop_equals_fixed_iterations(warm):
  rng = np.random.default_rng(16)
  feats, count = bank_of(rng, 6, CAP)
  feats[3, : count[3]] = separated(rng, int(count[3]))  # converges fast; the others take longer
  key = jax.random.key(17)
  prev = rng.normal(size=(6, C, DIM)).astype(np.float32) if warm else None
  run = functools.partial(km.kmeans_bank, num_clusters=C, key=key, iters=FIXED, prev_centers=prev)
  early, fixed = run(feats, count), run(feats, count, fixed_iters=True)
  for a, b in zip(early, fixed):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  n_iter = np.asarray(early[3])
  assert (n_iter < FIXED).all() and n_iter.min() < n_iter.max()  # classes converge at different times
  for k in range(6):  # a class's count does not depend on the others in the batch
    one = kmeans(
        feats[k],
        int(count[k]),
        C,
        jax.random.fold_in(key, k),
        iters=FIXED,
        prev_centers=None if prev is None else prev[k],
    )
    assert int(one[3]) == n_iter[k]
