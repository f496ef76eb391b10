"""Masked k-means for the support bank (docs/method.md 3.4): a Lloyd loop run to convergence, vmapped over classes.

Every function sees a whole ring buffer `points` [capacity, dim] and a fill `count`; only slots
< count are data. Empty slots are zeroed before any arithmetic, so whatever they hold (stale or
garbage values) cannot leak into the result or overflow. Matmuls run at HIGHEST precision: TPUs and
GPUs otherwise use bf16/tf32 passes, which is enough to flip nearest-centre assignments.

Stopping: `iters` is a maximum. Like scikit-learn's Lloyd with tol=0 ("strict convergence"), the loop
stops as soon as an iteration leaves every assignment unchanged; there is no tolerance on the centre
shift. Stopping early changes nothing: once the labels repeat, the centres are a fixed point and
every further iteration is an exact no-op (the loop body keeps the centres and labels by an explicit
select, so this does not rely on the mean of an unchanged assignment being recomputed bit for bit).
The result is therefore identical to running exactly `iters` iterations, which `fixed_iters=True`
still does (for tests and benchmarks); `n_iter` says how many ran. Under vmap (kmeans_bank) the
batched loop runs until every class has converged or hit `iters`; converged classes do not change.
With the class axis sharded this costs one scalar all-reduce (the loop condition) per iteration.

Empty clusters: as scikit-learn does, a cluster left without points takes the point farthest from its
centre before the means are taken (_relocate), so no prototype stays dead.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


class Clusters(NamedTuple):
  centers: jax.Array  # [C, dim] ([K, C, dim] for a bank)
  sizes: jax.Array  # [C] int32: points per centre
  valid: jax.Array  # [C] bool: False for the slots of a class with fewer points than centres
  n_iter: jax.Array  # int32: Lloyd iterations run (scikit-learn's `n_iter_` convention)


def _normalize(x: jax.Array) -> jax.Array:
  # rsqrt of a clamped square norm: idempotent on unit vectors (unlike x / (|x| + eps)), 0 stays 0.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _prepare(points: jax.Array, count, metric: str) -> tuple[jax.Array, jax.Array]:
  if metric not in ("euclidean", "cosine"):
    raise ValueError(f"unknown k-means metric {metric!r}")
  mask = jnp.arange(points.shape[0]) < count
  points = jnp.where(mask[:, None], points.astype(jnp.float32), 0.0)
  if metric == "cosine":
    points = _normalize(points)
  return points, mask


def _scores(points: jax.Array, centers: jax.Array, metric: str) -> jax.Array:
  """[clusters, capacity], lower is nearer: squared distance up to the per-point constant |x|^2.

  Centres-major because XLA's CPU matmul is ~1.5x faster with the short axis on the left here.
  """
  dots = jnp.dot(centers, points.T, precision=_HI)
  if metric == "cosine":
    return -dots
  return jnp.sum(centers * centers, axis=-1)[:, None] - 2.0 * dots


def _kmeanspp(points: jax.Array, mask: jax.Array, num_clusters: int, key: jax.Array) -> jax.Array:
  """Plain D^2 sampling (one candidate per step, not scikit-learn's greedy variant)."""
  keys = jax.random.split(key, num_clusters)
  uniform = jnp.where(mask, 0.0, -jnp.inf)

  def sq_dist_to(c):
    return jnp.where(mask, jnp.sum((points - c) ** 2, axis=-1), 0.0)

  first = points[jax.random.categorical(keys[0], uniform)]
  centers = jnp.zeros((num_clusters, points.shape[1]), points.dtype).at[0].set(first)

  def body(j, carry):
    centers, d2 = carry
    # Once every valid point coincides with a centre (few or duplicate points), D^2 is all zero:
    # fall back to uniform over the valid points instead of sampling from an all -inf logit vector.
    logits = jnp.where(jnp.sum(d2) > 0, jnp.where(mask, jnp.log(d2), -jnp.inf), uniform)
    c = points[jax.random.categorical(keys[j], logits)]
    return centers.at[j].set(c), jnp.minimum(d2, sq_dist_to(c))

  centers, _ = jax.lax.fori_loop(1, num_clusters, body, (centers, sq_dist_to(first)))
  return centers


def _masked_init(points, mask, num_clusters, key, init):
  if init == "kmeans++":
    return _kmeanspp(points, mask, num_clusters, key)
  if init == "random":
    # Distinct valid points: the top `num_clusters` of i.i.d. uniform scores over valid slots. A
    # full sort rather than lax.top_k, whose custom call XLA's partitioner gathers onto every
    # device instead of keeping it per class shard.
    scores = jnp.where(mask, jax.random.uniform(key, mask.shape), -1.0)
    idx = jnp.argsort(-scores)[jnp.arange(num_clusters) % mask.shape[0]]  # the modulo: capacity < clusters
    return points[idx]
  raise ValueError(f"unknown k-means init {init!r}")


def init_centers(points, count, num_clusters: int, key, init: str = "kmeans++", metric: str = "euclidean"):
  """Initial centres [num_clusters, dim] drawn from the valid slots of `points`.

  Needs count >= num_clusters to be meaningful (kmeans bypasses it otherwise). With metric="cosine"
  the points are L2-normalised first, as kmeans does.
  """
  points, mask = _prepare(points, count, metric)
  return _masked_init(points, mask, num_clusters, key, init)


def _sq_norms(points, metric):
  """|x|^2 per slot, the term _scores drops (1 for the unit vectors of the cosine metric)."""
  return None if metric == "cosine" else jnp.sum(points * points, axis=-1)


def _nearest(points, mask, centers, metric, sq_norms):
  """Labels [capacity] (-1 for empty slots) and each point's squared distance to its centre (-inf for
  empty slots), the distance scikit-learn ranks points by when it relocates an empty cluster.
  sq_norms: _sq_norms(points), computed once per Lloyd run rather than per iteration."""
  scores = _scores(points, centers, metric)
  labels = jnp.argmin(scores, axis=0)
  best = jnp.min(scores, axis=0)
  dist = 2.0 + 2.0 * best if metric == "cosine" else sq_norms + best  # unit vectors: 2 - 2 x.c
  return jnp.where(mask, labels, -1), jnp.where(mask, dist, -jnp.inf)


def _assign(points, mask, centers, metric):
  labels = jnp.argmin(_scores(points, centers, metric), axis=0)
  return jnp.where(mask, labels, -1)


def _relocate(labels, dist, mask, num_clusters):
  """scikit-learn's rule for empty clusters (`_relocate_empty_clusters_dense`): each cluster with no
  point takes the point farthest from its own centre, the j-th empty cluster (in index order) the j-th
  farthest point, and that point leaves its cluster. Without it an empty cluster stays empty for
  good: 5 of 20 classes of a VOC-sized bank ended with a dead prototype."""
  clusters = jnp.arange(num_clusters)
  empty = ~jnp.any(labels[None, :] == clusters[:, None], axis=1)  # [C]
  # Farthest first, equal distances to the lower slot. A full sort, not lax.top_k: XLA's partitioner
  # gathers a top_k's operand onto every device when the class axis is sharded.
  order = jnp.argsort(-dist)
  pick = order[jnp.maximum(jnp.cumsum(empty) - 1, 0)]  # [C] the point each empty cluster would take
  take = empty & mask[pick]  # a near-empty ring buffer has no far point to give
  chosen = (jnp.arange(labels.shape[0])[None, :] == pick[:, None]) & take[:, None]  # [C, capacity]
  return jnp.where(jnp.any(chosen, axis=0), jnp.argmax(chosen, axis=0), labels)


def _update(points, mask, labels, dist, centers, metric):
  """One M-step: the mean of each cluster's points after empty clusters took a far point each
  (_relocate); a cluster still empty keeps its previous centre."""
  num_clusters = centers.shape[0]
  labels = _relocate(labels, dist, mask, num_clusters)
  # A one-hot matmul rather than segment_sum: faster on XLA's CPU (10 vs 24 ms on a VOC-sized bank),
  # and TPUs are poor at scatter-add.
  member = (labels[None, :] == jnp.arange(num_clusters)[:, None]).astype(points.dtype)  # [C, capacity]
  sums = jnp.dot(member, points, precision=_HI)
  sizes = jnp.sum(member, axis=1)[:, None]
  new = sums / jnp.maximum(sizes, 1.0)
  if metric == "cosine":
    new = _normalize(new)
  return jnp.where(sizes > 0, new, centers)


def _lloyd(points, mask, centers, iters, metric, fixed_iters=False):
  """At most `iters` Lloyd iterations; returns (centers, labels, n_iter).

  labels = _assign(centers) for the returned centres. The loop carries the labels of its current
  centres, so each iteration is one centre update followed by one assignment, and it stops after the
  first iteration whose assignment equals the previous one. n_iter counts iterations the way
  scikit-learn's `n_iter_` does (its iteration = assignment, then update; the no-change one counted):
  centre updates + 1 when converged, capped at `iters`. fixed_iters=True runs all `iters` iterations
  (the extra ones are exact no-ops) and reports the same n_iter.
  """
  sq_norms = _sq_norms(points, metric)
  labels, dist = _nearest(points, mask, centers, metric, sq_norms)

  def cond(state):
    it, _, _, _, changed, _ = state
    return it < iters if fixed_iters else (it < iters) & changed

  def body(state):
    it, centers, labels, dist, changed, updates = state
    # Once nothing changed, keep everything as is: the state is a fixed point by construction.
    new_centers = jnp.where(changed, _update(points, mask, labels, dist, centers, metric), centers)
    new_labels, new_dist = _nearest(points, mask, new_centers, metric, sq_norms)
    new_labels = jnp.where(changed, new_labels, labels)
    new_dist = jnp.where(changed, new_dist, dist)
    changed_now = jnp.any(new_labels != labels)
    return it + 1, new_centers, new_labels, new_dist, changed_now, updates + changed.astype(jnp.int32)

  init = (jnp.int32(0), centers, labels, dist, jnp.bool_(True), jnp.int32(0))
  _, centers, labels, _, changed, updates = jax.lax.while_loop(cond, body, init)
  n_iter = jnp.minimum(updates + (~changed).astype(jnp.int32), iters)
  return centers, labels, n_iter


def _prepare_centers(centers, metric):
  centers = centers.astype(jnp.float32)
  return _normalize(centers) if metric == "cosine" else centers


def lloyd(
    points, count, centers, iters: int = 30, metric: str = "euclidean", *, fixed_iters: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Lloyd iterations from `centers` over the valid slots of `points` until no assignment changes,
  at most `iters` of them (no centre-shift tolerance); returns (centres, iterations run)."""
  points, mask = _prepare(points, count, metric)
  centers, _, n_iter = _lloyd(points, mask, _prepare_centers(centers, metric), iters, metric, fixed_iters)
  return centers, n_iter


def assign(points, count, centers, metric: str = "euclidean") -> jax.Array:
  """[capacity] int32 index of the nearest centre per slot, -1 for empty slots."""
  points, mask = _prepare(points, count, metric)
  return _assign(points, mask, centers.astype(jnp.float32), metric).astype(jnp.int32)


def kmeans(
    points,
    count,
    num_clusters: int,
    key,
    *,
    iters: int = 30,
    init: str = "kmeans++",
    metric: str = "euclidean",
    prev_centers=None,
    fixed_iters: bool = False,
) -> Clusters:
  """Clusters the first `count` slots of `points` [capacity, dim] into `num_clusters` groups.

  Lloyd runs until no assignment changes (scikit-learn's strict convergence; no centre-shift
  tolerance), at most `iters` iterations; the result equals that of exactly `iters` iterations.
  prev_centers, if given, replaces the random init (warm start from a previous run). With fewer
  valid points than clusters the centres are the points themselves, in slot order, the rest masked.
  fixed_iters=True always runs `iters` iterations (the same result, slower). Returns Clusters.
  """
  capacity, dim = points.shape
  points, mask = _prepare(points, count, metric)
  if prev_centers is None:
    centers = _masked_init(points, mask, num_clusters, key, init)
  else:
    centers = _prepare_centers(prev_centers, metric)
  centers, labels, n_iter = _lloyd(points, mask, centers, iters, metric, fixed_iters)
  sizes = jnp.sum(labels[:, None] == jnp.arange(num_clusters)[None, :], axis=0, dtype=jnp.int32)

  # Too few points: every valid point is its own context prototype.
  few = count < num_clusters
  head = points[:num_clusters]
  if capacity < num_clusters:
    head = jnp.pad(head, ((0, num_clusters - capacity), (0, 0)))
  slot_valid = jnp.arange(num_clusters) < count
  few_centers = jnp.where(slot_valid[:, None], head, 0.0)
  return Clusters(
      jnp.where(few, few_centers, centers),
      jnp.where(few, slot_valid.astype(jnp.int32), sizes),
      jnp.where(few, slot_valid, True),
      n_iter,
  )


@functools.partial(jax.jit, static_argnames=("num_clusters", "iters", "init", "metric", "fixed_iters"))
def kmeans_bank(bank_feats, bank_count, num_clusters: int, key, *, prev_centers=None, **options) -> Clusters:
  """kmeans on every class of a bank: [K, capacity, dim], [K] -> Clusters of [K, C, dim], [K, C],
  [K, C], [K].

  Each class gets fold_in(key, class index), so a class's result does not depend on how many
  classes there are or how they are sharded; with the class axis sharded, each device clusters its
  own classes (the shared loop condition, "has any class not converged", is the only cross-device
  traffic: one scalar all-reduce per iteration). Lloyd stops once every class has converged (no
  assignment changed) or after `iters` iterations; a converged class is not changed further, so the
  result is the same as with `iters` iterations. prev_centers, if given, is [K, C, dim]; options are
  kmeans's (iters, init, metric, fixed_iters).
  """
  keys = jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(bank_feats.shape[0]))
  run = functools.partial(kmeans, num_clusters=num_clusters, **options)
  if prev_centers is None:
    return jax.vmap(lambda p, c, k: run(p, c, key=k))(bank_feats, bank_count, keys)
  warm = jax.vmap(lambda p, c, k, pc: run(p, c, key=k, prev_centers=pc))
  return warm(bank_feats, bank_count, keys, prev_centers)
