"""K-means on the support bank: our jitted kmeans_bank against scikit-learn's Lloyd, class by class.

Both start from the same initial centres (our k-means++ draw) and run Lloyd in float32, in one
process on the same machine, with the same stopping rule: stop once an iteration changes no label
(scikit-learn with tol=0, "strict convergence"), at most --iters iterations. Iteration counts use
scikit-learn's `n_iter_` convention (the final no-change iteration counted). kmeans_bank runs all
classes in one batched loop, which goes on until the slowest class converges (the others are
frozen), so its ms/iter divides by the largest class count; scikit-learn stops each class on its
own, so its ms/iter divides by the mean. A third row forces exactly --iters iterations (the old
fixed-length loop; same result).

  python bench/kmeans_bench.py [--classes 20 --capacity 1000 --dim 768 --clusters 50 --iters 30
                                --threads 2 --json out.json]
"""

import argparse
import json
import os
import statistics
import sys
import time

import md_table  # bench/md_table.py, beside this script
import xla_cpu


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--classes", type=int, default=20)
  p.add_argument("--capacity", type=int, default=1000)
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--clusters", type=int, default=50)
  p.add_argument("--iters", type=int, default=30)
  p.add_argument("--threads", type=int, default=2, help="CPU threads for XLA and for scikit-learn")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", type=str, default=None, help="write the results as JSON to this path")
  return p.parse_args(argv)


def make_bank(rng, classes, capacity, dim, clusters):
  """Each class: a Gaussian mixture with 1.2x more modes than clusters (prototypes are not one blob).
  Banks are full, as they are after the first epoch."""
  import numpy as np

  modes = rng.normal(size=(classes, int(clusters * 1.2), dim)).astype(np.float32)
  pick = rng.integers(0, modes.shape[1], (classes, capacity))
  feats = np.take_along_axis(modes, pick[..., None], axis=1)
  feats += 0.5 * rng.normal(size=feats.shape).astype(np.float32)
  return feats, np.full((classes,), capacity, np.int32)


def median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv=None):
  args = parse_args(argv)
  xla_cpu.limit_threads(args.threads)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import jax.numpy as jnp
  import numpy as np
  import sklearn
  from sklearn.cluster import KMeans
  from threadpoolctl import threadpool_limits

  from cpal_jax.method import kmeans as km

  rng = np.random.default_rng(args.seed)
  feats, count = make_bank(rng, args.classes, args.capacity, args.dim, args.clusters)
  key = jax.random.key(args.seed)
  dev_feats, dev_count = jax.device_put(feats), jax.device_put(count)

  # The initial centres kmeans_bank would draw itself (fold_in by class index), shared with sklearn.
  keys = jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(args.classes))
  draw = jax.jit(jax.vmap(lambda p, n, k: km.init_centers(p, n, args.clusters, k)))
  init = np.asarray(draw(dev_feats, dev_count, keys))

  rows = []

  def time_jax(name, call_args, fixed_iters=False, with_init=True):
    static = dict(num_clusters=args.clusters, iters=args.iters, fixed_iters=fixed_iters)
    fn = jax.jit(lambda x, n, k, prev=None: km.kmeans_bank(x, n, key=k, prev_centers=prev, **static))
    t = time.perf_counter()
    compiled = fn.lower(*call_args).compile()
    compile_s = time.perf_counter() - t
    out = jax.block_until_ready(compiled(*call_args))  # warm-up
    run_s = median_time(lambda: jax.block_until_ready(compiled(*call_args)), args.repeats)
    n_iter = np.asarray(out.n_iter)
    loop_iters = args.iters if fixed_iters else int(n_iter.max())  # the batched loop's trip count
    rows.append(
        dict(
            name=name,
            compile_s=compile_s,
            run_s=run_s,
            iters_mean=float(n_iter.mean()),
            iters_max=int(n_iter.max()),
            loop_iters=loop_iters,
        )
    )
    return out[:3], n_iter

  sk_centers, sk_labels, sk_iters = [], [], []

  def run_sklearn():
    sk_centers.clear(), sk_labels.clear(), sk_iters.clear()
    with threadpool_limits(args.threads):
      for k in range(args.classes):
        m = KMeans(args.clusters, init=init[k], n_init=1, max_iter=args.iters, tol=0, algorithm="lloyd")
        m.fit(feats[k, : count[k]])
        sk_centers.append(m.cluster_centers_)
        sk_labels.append(m.labels_)
        sk_iters.append(m.n_iter_)

  run_sklearn()  # warm-up (thread pools, imports)
  sk_s = median_time(run_sklearn, args.repeats)
  sk_iters_arr = np.asarray(sk_iters)

  given = (dev_feats, dev_count, key, jax.device_put(init))
  ours, our_iters = time_jax("jax kmeans_bank, converged, given init", given)
  time_jax("jax kmeans_bank, converged, k-means++ init (incl.)", (dev_feats, dev_count, key))
  fixed, _ = time_jax(f"jax kmeans_bank, fixed {args.iters} iters, given init", given, fixed_iters=True)
  rows.append(
      dict(
          name=f"sklearn {sklearn.__version__} KMeans, loop over classes",
          compile_s=None,
          run_s=sk_s,
          iters_mean=float(sk_iters_arr.mean()),
          iters_max=int(sk_iters_arr.max()),
          loop_iters=float(sk_iters_arr.mean()),
      )
  )

  # Both move an empty cluster to the point farthest from its centre, so every class compares.
  centers, sizes = np.asarray(ours[0]), np.asarray(ours[1])
  no_empty = (sizes > 0).all(axis=1)
  max_diff = float(np.abs(centers - np.stack(sk_centers)).max())
  labels = np.stack([np.asarray(km.assign(feats[k], count[k], centers[k])) for k in range(args.classes)])
  label_agree = float((labels == np.stack(sk_labels)).mean())
  iters_agree = int((our_iters == sk_iters_arr).sum())
  # Converged Lloyd is a fixed point: the fixed-length loop must give the very same bits.
  fixed_identical = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, fixed))

  print(
      f"\nk-means on a bank of {args.classes} classes x {args.capacity} x {args.dim}, "
      f"{args.clusters} clusters, max {args.iters} iterations, {args.threads} threads, "
      f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})"
  )
  print(f"{'implementation':<52} {'compile s':>10} {'run s':>8} {'iters mean':>10} {'max':>4} {'ms/iter':>8}")
  for r in rows:
    comp = "" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
    r["ms_per_iter"] = 1e3 * r["run_s"] / r["loop_iters"]
    print(
        f"{r['name']:<52} {comp:>10} {r['run_s']:>8.4f} {r['iters_mean']:>10.2f} {r['iters_max']:>4} "
        f"{r['ms_per_iter']:>8.1f}"
    )
  speedup = sk_s / rows[0]["run_s"]
  speedup_fixed = sk_s / rows[2]["run_s"]
  print(
      f"sklearn time / jax time: {speedup:.2f}x converged, {speedup_fixed:.2f}x with jax fixed at "
      f"{args.iters} iterations; early stop saves {1 - rows[0]['run_s'] / rows[2]['run_s']:.0%} of the fixed loop"
  )
  print(f"iteration counts equal to sklearn's n_iter_: {iters_agree}/{args.classes} classes")
  print(
      f"classes ending with an empty cluster: {int((~no_empty).sum())}/{args.classes}; max |centre "
      f"difference| (all classes): {max_diff:.2e}; label agreement (all classes): {label_agree:.4%}"
  )
  print(f"converged and fixed {args.iters}-iteration results bit-identical: {fixed_identical}")
  md_table.emit(
      ["implementation", "run s", "iterations (mean, max)", "ms/iteration"],
      [[r["name"], f"{r['run_s']:.4f}", f"{r['iters_mean']:.2f}, {r['iters_max']}", f"{r['ms_per_iter']:.1f}"]
       for r in rows],
      f", {args.threads} threads; sklearn / jax {speedup:.2f}x",
  )

  if args.json:
    with open(args.json, "w") as f:
      json.dump(
          dict(
              config=vars(args),
              backend=jax.default_backend(),
              rows=rows,
              speedup=speedup,
              speedup_fixed=speedup_fixed,
              jax_n_iter=our_iters.tolist(),
              sklearn_n_iter=sk_iters_arr.tolist(),
              iters_agree=iters_agree,
              classes_with_empty_cluster=int((~no_empty).sum()),
              max_center_diff=max_diff,
              label_agreement=label_agree,
              fixed_identical=fixed_identical,
          ),
          f,
          indent=2,
      )


if __name__ == "__main__":
  main()
