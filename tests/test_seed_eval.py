import numpy as np

from cpal_jax.eval import miou
from cpal_jax.eval.seed import SeedScorer
from cpal_jax.infer.cam import channel_keys


def _add(scorer, maps, gt, label):
  """Stores the present channels as make_cam does, then scores them."""
  keys = channel_keys(label, scorer.has_bg)
  channels = keys if scorer.has_bg else keys - 1
  scorer.add(np.moveaxis(maps[..., channels], -1, 0), keys, gt)


def _random_case(rng, c=5, h=7, w=9):
  label = np.zeros(c - 1, np.float32)
  label[rng.choice(c - 1, size=2, replace=False)] = 1
  maps = rng.random((h, w, c - 1)).astype(np.float32) * label
  gt = rng.integers(0, c, (h, w))
  gt[rng.random((h, w)) < 0.1] = 255
  return maps, gt, label


def test_threshold_sweep_matches_brute_force():
  rng = np.random.default_rng(0)
  c = 5
  scorer = SeedScorer(c, has_background=False, threshold_max=0.59)
  cases = [_random_case(rng, c) for _ in range(4)]
  # Put some top scores exactly on thresholds: the background plane wins ties (np.argmax picks it).
  # The tie values must be exact in float32 *and* equal to the float64 thresholds (float32(0.3) is
  # above 0.3, so it never ties): 0.25 and 0.5 are, and each is the pixel's top score.
  for case, (y, x), v in ((0, (0, 0), 0.25), (0, (3, 4), 0.5), (1, (2, 2), 0.5), (2, (6, 8), 0.25)):
    m, g, l = cases[case]
    present = np.flatnonzero(l)
    m[y, x, present] = np.float32(0.01)
    m[y, x, present[0]] = np.float32(v)
    g[y, x] = 0  # scored (not 255): background and foreground predictions differ here
    assert np.any(scorer.thresholds == m[y, x].max())  # an exact tie with a swept threshold
  for m, g, l in cases:
    _add(scorer, m, g, l)
  sweep = scorer.sweep()
  for k, t in enumerate(scorer.thresholds):
    conf = np.zeros((c, c), np.int64)
    for m, g, l in cases:
      keys = np.concatenate([[0], np.flatnonzero(l) + 1])
      stacked = np.concatenate([np.full(m.shape[:2] + (1,), t), m[..., keys[1:] - 1]], -1)
      conf += miou.confusion(g, keys[np.argmax(stacked, -1)], c)
    np.testing.assert_array_equal(sweep[k], conf, err_msg=f"t={t}")
  res = scorer.result([f"c{i}" for i in range(c)], 0.15)
  best = max(miou.miou(s) for s in sweep)
  assert res["seed_miou"] == round(100 * best, 3)
  assert res["seed_miou_fixed_threshold"]["t"] == 0.15


def test_argmax_with_background_channel_only_over_present_classes():
  c = 4
  scorer = SeedScorer(c, has_background=True)
  maps = np.zeros((2, 2, c), np.float32)
  maps[..., 0] = 0.4
  maps[0, 0, 1] = 0.9  # present
  maps[0, 1, 3] = 0.9  # absent class: must not be predicted
  label = np.array([1, 0, 0], np.float32)
  gt = np.array([[1, 0], [0, 255]])
  _add(scorer, maps, gt, label)
  expected = miou.confusion(gt, np.array([[1, 0], [0, 0]]), c)
  np.testing.assert_array_equal(scorer.conf, expected)
  res = scorer.result(["bg", "a", "b", "c"], 0.15)
  assert res["thresholds"]["seed"] is None and res["seed_miou"] == 100.0


def test_trivial_baselines():
  c = 3
  scorer = SeedScorer(c, has_background=True)
  gt = np.array([[0, 2], [2, 2]])
  label = np.array([0, 1], np.float32)
  _add(scorer, np.zeros((2, 2, c), np.float32), gt, label)
  res = scorer.result(["bg", "a", "b"], 0.15)
  # all background: bg IoU 1/4, class b IoU 0 -> mean over bg and b = 12.5
  assert res["baselines"]["all_background"] == 12.5
  # label fill (class 2 everywhere): bg 0, b 3/4 -> 37.5
  assert res["baselines"]["label_fill"] == 37.5
