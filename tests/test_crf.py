"""Dense CRF wrappers on small synthetic images: the CRF must clean noise that follows no image edge,
the seed volume must reproduce the threshold convention, cam_to_ir_label must give fg / 255 / 0
where the maps are confident / in between / low, and the process pool must keep order."""

import time

import numpy as np
import pytest

from cpal_jax import defaults
from cpal_jax.refine import crf

H, W = 48, 64


def two_region_image(seed=0):
  """Left half dark, right half bright, plus smooth noise well below the step (srgb scale)."""
  rng = np.random.default_rng(seed)
  noise = rng.normal(0, 12, (H, W, 3))
  for axis in (0, 1):  # box blur by shifted copies: smooth texture, no new edges
    noise = sum(np.roll(noise, s, axis=axis) for s in range(-3, 4)) / 7
  base = np.where(np.arange(W)[None, :, None] < W // 2, 60.0, 190.0)
  image = np.clip(base + noise, 0, 255).astype(np.uint8)
  truth = (np.arange(W)[None, :] >= W // 2).repeat(H, 0).astype(np.int64)
  return image, truth


def salt(truth, k, frac, rng):
  """truth with a fraction `frac` of pixels set to a random wrong label."""
  noisy = truth.copy()
  flip = rng.random(truth.shape) < frac
  noisy[flip] = (truth[flip] + rng.integers(1, k, flip.sum())) % k
  return noisy


def test_prob_crf_cleans_salt_noise():
  image, truth = two_region_image()
  rng = np.random.default_rng(1)
  k = 3
  noisy = salt(truth, k, 0.3, rng)
  probs = np.full((k, H, W), 0.1, np.float32)
  np.put_along_axis(probs, noisy[None], 0.8, axis=0)  # confident, and wrong on 30% of pixels
  probs[2, :4] = 0.0  # exact zeros must be clipped, not -log(0) = inf
  q = crf.prob_crf(image, probs)
  assert q.shape == (k, H, W) and q.dtype == np.float32
  assert np.all(np.isfinite(q))
  np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
  acc_noisy = np.mean(np.argmax(probs, 0) == truth)
  acc_crf = np.mean(np.argmax(q, 0) == truth)
  assert acc_noisy < 0.75
  assert acc_crf > 0.95
  assert acc_crf - acc_noisy > 0.2
  # The image edge does part of the work: on a flat image only the smoothness terms act.
  flat = crf.prob_crf(np.full_like(image, 128), probs)
  assert np.mean(np.argmax(flat, 0) == truth) < acc_crf - 0.05


def test_label_crf_cleans_noisy_labels():
  image, truth = two_region_image(seed=2)
  rng = np.random.default_rng(3)
  noisy = salt(truth, 3, 0.25, rng)
  out = crf.label_crf(image, noisy, 3)
  assert out.shape == (H, W) and np.issubdtype(out.dtype, np.integer)
  acc_noisy = np.mean(noisy == truth)
  acc_crf = np.mean(out == truth)
  assert acc_crf > 0.95
  assert acc_crf - acc_noisy > 0.15


# ---------------------------------------------------------- the upstream calls, transcribed


def psa_crf_inference(img, probs, t=10, scale_factor=1, labels=21):
  """PSA's tool/imutils.crf_inference, as upstream writes it (pydensecrf called directly)."""
  import pydensecrf.densecrf as dcrf
  from pydensecrf.utils import unary_from_softmax

  h, w = img.shape[:2]
  n_labels = labels
  d = dcrf.DenseCRF2D(w, h, n_labels)
  unary = unary_from_softmax(probs)
  unary = np.ascontiguousarray(unary)
  d.setUnaryEnergy(unary)
  d.addPairwiseGaussian(sxy=3 / scale_factor, compat=3)
  d.addPairwiseBilateral(sxy=80 / scale_factor, srgb=13, rgbim=np.copy(img), compat=10)
  Q = d.inference(t)
  return np.array(Q).reshape((n_labels, h, w))


def irn_crf_inference_label(img, labels, t=10, n_labels=21, gt_prob=0.7):
  """IRN's misc/imutils.crf_inference_label, as upstream writes it."""
  import pydensecrf.densecrf as dcrf
  from pydensecrf.utils import unary_from_labels

  h, w = img.shape[:2]
  d = dcrf.DenseCRF2D(w, h, n_labels)
  unary = unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False)
  d.setUnaryEnergy(unary)
  d.addPairwiseGaussian(sxy=3, compat=3)
  d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(img)), compat=10)
  q = d.inference(t)
  return np.argmax(np.array(q).reshape((n_labels, h, w)), axis=0)


def textured_case(seed, k):
  """An image with edges and texture (no term is idle) and soft, noisy maps with exact zeros."""
  image, truth = two_region_image(seed)
  rng = np.random.default_rng(seed + 100)
  image = np.clip(image.astype(np.int64) + rng.integers(-25, 26, image.shape), 0, 255).astype(np.uint8)
  probs = rng.random((k, H, W)).astype(np.float32) ** 2
  probs[truth[None] == np.arange(k)[:, None, None] % 2] += 0.35
  probs[1, :6, :10] = 0.0  # clipped at 1e-5 by both
  return image, truth, probs


def test_prob_crf_is_psas_crf_inference():
  """prob_crf's defaults (3/3 Gaussian, 80/13/10 bilateral, 10 steps, clip 1e-5) are PSA's call."""
  k = 4
  image, _, probs = textured_case(5, k)
  got = crf.prob_crf(image, probs)
  want = psa_crf_inference(image, probs, labels=k)
  np.testing.assert_array_equal(got, want.astype(np.float32))
  for iters in (1, 5):
    np.testing.assert_array_equal(
        crf.prob_crf(image, probs, iters=iters), psa_crf_inference(image, probs, t=iters, labels=k)
    )
  # The case tells the parameter sets apart (IRN's 50/5 bilateral moves the marginals).
  other = crf.prob_crf(image, probs, bi_sxy=50, bi_srgb=5)
  assert np.abs(other - want).max() > 1e-3


def test_label_crf_is_irns_crf_inference_label():
  """label_crf's defaults (gt_prob 0.7, 3/3 Gaussian, 50/5/10 bilateral, 10 steps) are IRN's call."""
  k = 4
  image, _, probs = textured_case(6, k)
  labels = np.argmax(probs, 0)
  got = crf.label_crf(image, labels, k)
  want = irn_crf_inference_label(image, labels, n_labels=k)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(
      crf.label_crf(image, labels, k, gt_prob=0.9, iters=3), irn_crf_inference_label(image, labels, 3, k, 0.9)
  )
  # The case tells the parameter sets apart: PSA's bilateral, or another gt_prob, move labels.
  assert (crf.label_crf(image, labels, k, bi_sxy=80, bi_srgb=13) != want).any()
  assert (irn_crf_inference_label(image, labels, n_labels=k, gt_prob=0.5) != want).any()


def test_ir_label_is_irns_cam_to_ir_label():
  """IRN's cam_to_ir_label composed from the transcribed call: fg_conf / bg_conf from the argmax of
  the maps padded with conf_fg_thres 0.30 / conf_bg_thres 0.05, then 255 / 0 as IRN sets them."""
  k = 3
  image, band = banded_image(5)
  rng = np.random.default_rng(8)
  # Low-contrast bands under strong pixel noise: the CRF's answer depends on its parameters.
  image = np.clip(0.4 * image + 80 + rng.normal(0, 30, image.shape), 0, 255).astype(np.uint8)
  # Bands: channel 0, 1, 2 confident, then unsure (0.15), then background (0.01); times noise for
  # the CRF to clean, so the two CRF calls have work to do.
  values = np.array([[0.9, 0.2, 0.1, 0.15, 0.01], [0.1, 0.8, 0.1, 0.10, 0.02], [0.2, 0.1, 0.9, 0.1, 0.0]])
  cams = np.broadcast_to(values[:, band][:, None, :], (k, H, W))
  cams = np.clip(cams * np.exp(rng.normal(0, 0.5, cams.shape)), 0, 1).astype(np.float32)
  fg_conf_cam = np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=0.30)
  fg_conf = irn_crf_inference_label(image, np.argmax(fg_conf_cam, axis=0), n_labels=k + 1)
  bg_conf_cam = np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=0.05)
  bg_conf = irn_crf_inference_label(image, np.argmax(bg_conf_cam, axis=0), n_labels=k + 1)
  conf = fg_conf.copy()
  conf[fg_conf == 0] = 255
  conf[bg_conf + fg_conf == 0] = 0
  got = crf.ir_label(image, cams, False)
  np.testing.assert_array_equal(got, conf)
  assert set(np.unique(conf).tolist()) == {0, 1, 2, 3, 255}  # every outcome occurs
  fg_raw = np.argmax(fg_conf_cam, axis=0)
  assert (fg_raw != fg_conf).mean() > 0.02  # and the CRF changed the labels it was given
  # The case tells the settings apart: another gt_prob, PSA's bilateral or other thresholds move it.
  for kw in ({"gt_prob": 0.5}, {"bi_sxy": 80, "bi_srgb": 13}, {"bg_threshold": 0.1}, {"fg_threshold": 0.25}):
    assert (crf.ir_label(image, cams, False, **kw) != conf).any(), kw


def test_label_crf_single_label():
  image, _ = two_region_image()
  np.testing.assert_array_equal(crf.label_crf(image, np.zeros((H, W), np.int64), 1), 0)


def test_seed_probs_matches_threshold_convention():
  t = 0.15
  fg = np.array([[[0.10, 0.15, 0.16, 0.90]], [[0.05, 0.14, 0.20, 0.95]]], np.float32)  # [2, 1, 4]
  vol = crf.seed_probs(fg, False, t)
  assert vol.shape == (3, 1, 4)
  assert vol.dtype == np.float32
  np.testing.assert_array_equal(vol[0], np.float32(t))
  np.testing.assert_array_equal(vol[1:], fg)
  # The seed rule: foreground (its argmax channel) where the top score > t, else background.
  top = fg.max(0)
  expected = np.where(top > np.float32(t), 1 + np.argmax(fg, 0), 0)
  np.testing.assert_array_equal(np.argmax(vol, 0), expected)
  np.testing.assert_array_equal(expected, [[0, 0, 2, 2]])  # a tie at t stays background (IRN)

  with_bg = np.array([[[0.9, 0.2]], [[0.1, 0.7]], [[0.3, 0.1]]], np.float32)
  vol = crf.seed_probs(with_bg, True, t)
  np.testing.assert_array_equal(vol, with_bg)
  np.testing.assert_array_equal(np.argmax(vol, 0), [[0, 1]])


def banded_image(n_bands):
  """Vertical bands of clearly different colours, so no CRF term couples two bands."""
  colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [220, 220, 60], [30, 30, 30]])
  band = np.arange(W) * n_bands // W
  image = np.broadcast_to(colours[band][None], (H, W, 3)).astype(np.uint8)
  return image, band


def band_interiors(band, n_bands, margin=4):
  """Column masks of each band away from its edges (the Gaussian term blurs a few pixels)."""
  cols = np.arange(W)
  out = []
  for b in range(n_bands):
    idx = cols[band == b]
    out.append((cols >= idx[0] + margin) & (cols <= idx[-1] - margin))
  return out


def test_ir_label_irn_variant():
  image, band = banded_image(4)
  # bands: channel 0 confident, channel 1 confident, between 0.05 and 0.30, below 0.05
  values = np.array([[0.9, 0.2, 0.15, 0.01], [0.1, 0.8, 0.10, 0.02]], np.float32)
  maps = np.broadcast_to(values[:, band][:, None, :], (2, H, W)).copy()
  before = maps.copy()
  out = crf.ir_label(image, maps, False)
  assert out.shape == (H, W) and out.dtype == np.uint8
  np.testing.assert_array_equal(maps, before)
  for cols, want in zip(band_interiors(band, 4), [1, 2, 255, 0]):
    np.testing.assert_array_equal(out[:, cols], want)


def test_ir_label_sipe_variant():
  image, band = banded_image(4)
  # channel 0 is background. Band 2: background wins the plain argmax (-> fg_conf 0) but loses
  # once scaled by 0.5 (-> bg_conf 1): unsure. Band 3: background wins both: background.
  values = np.array([[0.2, 0.1, 0.6, 0.9], [0.9, 0.1, 0.4, 0.1], [0.1, 0.8, 0.1, 0.05]], np.float32)
  maps = np.broadcast_to(values[:, band][:, None, :], (3, H, W)).copy()
  before = maps.copy()
  out = crf.ir_label(image, maps, True)
  np.testing.assert_array_equal(maps, before)  # SIPE's in-place scaling must not leak out
  for cols, want in zip(band_interiors(band, 4), [1, 2, 255, 0]):
    np.testing.assert_array_equal(out[:, cols], want)


def test_to_class_ids_keeps_unsure():
  idx = np.array([[0, 1, 2, 255]], np.uint8)
  out = crf.to_class_ids(idx, np.array([0, 5, 12]))
  np.testing.assert_array_equal(out, [[0, 5, 12, 255]])
  assert out.dtype == np.uint8
  with pytest.raises(ValueError, match="keys"):
    crf.to_class_ids(np.array([3]), np.array([0, 5, 12]))


def _crf_job(item):
  """Top-level (picklable) worker: a label CRF on a seeded noisy map; early items sleep longest so
  that they finish last if the pool reorders."""
  seed, delay = item
  time.sleep(delay)
  image, truth = two_region_image(seed)
  noisy = salt(truth, 3, 0.25, np.random.default_rng(seed))
  return seed, crf.label_crf(image, noisy, 3, iters=3)


def test_map_images_pool_matches_in_process_and_keeps_order():
  items = [(s, 0.3 * (3 - s)) for s in range(4)]
  serial = list(crf.map_images(_crf_job, items, workers=1))
  pooled = list(crf.map_images(_crf_job, items, workers=2))
  assert [s for s, _ in pooled] == [0, 1, 2, 3]
  for (s1, a), (s2, b) in zip(serial, pooled):
    assert s1 == s2
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="workers"):
    list(crf.map_images(_crf_job, items, workers=-1))


def test_bad_inputs_raise():
  image, truth = two_region_image()
  probs = np.full((2, H, W), 0.5, np.float32)
  with pytest.raises(ValueError, match="does not match"):
    crf.prob_crf(image, probs[:, :-1])
  with pytest.raises(ValueError, match=r"\[K, H, W\]"):
    crf.prob_crf(image, probs[0])
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    crf.prob_crf(image[..., 0], probs)
  with pytest.raises(ValueError, match="uint8"):
    crf.prob_crf(image.astype(np.float32), probs)
  with pytest.raises(ValueError, match="nan"):
    crf.prob_crf(image, np.where(truth == 0, np.nan, probs).astype(np.float32))
  with pytest.raises(ValueError, match="does not match"):
    crf.label_crf(image, truth[:-1], 2)
  with pytest.raises(ValueError, match="outside"):
    crf.label_crf(image, truth + 1, 2)
  with pytest.raises(ValueError, match="integers"):
    crf.label_crf(image, truth.astype(np.float32), 2)
  with pytest.raises(ValueError, match="does not match"):
    crf.ir_label(image, probs[:, :, :-1], False)
  with pytest.raises(ValueError, match=r"\[K, H, W\]"):
    crf.seed_probs(probs[0], False, 0.15)


def test_config_keys_are_accepted():
  """The refine config blocks unpack straight into the wrappers (imports JAX through the config)."""

  cfg = defaults.base().refine
  image, band = banded_image(4)
  maps = np.broadcast_to(np.array([0.9, 0.6, 0.15, 0.01], np.float32)[band], (1, H, W))
  q = crf.prob_crf(image, crf.seed_probs(maps, False, 0.15), **cfg.crf)
  assert q.shape == (2, H, W)
  out = crf.ir_label(image, maps, False, **cfg.ir_label)
  for cols, want in zip(band_interiors(band, 4), [1, 1, 255, 0]):
    np.testing.assert_array_equal(out[:, cols], want)
