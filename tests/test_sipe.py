"""SIPE functions against plain-numpy transcriptions of the original PyTorch code (docs/method.md 2).

References loop over images, classes and pixels in float64, so they share nothing with the jnp
code but the formulas. NHWC throughout, channel 0 = background.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpal_jax import image_ops
from cpal_jax.method import sipe

EPS = 1e-5
B, H, W, C, D = 2, 5, 5, 4, 6  # C includes background


# ------------------------------------------------------------------ numpy references


def np_relu(x):
  return np.maximum(x, 0.0)


def np_max_normalize(x):
  out = np.empty(x.shape)
  for b in range(x.shape[0]):
    for c in range(x.shape[3]):
      out[b, :, :, c] = x[b, :, :, c] / (x[b, :, :, c].max() + EPS)
  return out


def np_norm_cam_with_background(cam):
  norm = np_max_normalize(np_relu(cam.astype(np.float64)))
  bkg = 1.0 - norm.max(axis=-1, keepdims=True)
  return np.concatenate([bkg, norm], axis=-1)


def np_label_mask(valid, labels):
  b, h, w = valid.shape
  c = labels.shape[1] + 1
  out = np.zeros((b, h, w, c))
  for n in range(b):
    for k in range(c):
      out[n, :, :, k] = valid[n] * (1.0 if k == 0 else labels[n, k - 1])
  return out


def np_l2_normalize(f):
  f = f.astype(np.float64)
  return f / (np.sqrt((f * f).sum(-1, keepdims=True)) + EPS)


def np_resize_bilinear(x, size):
  """torch F.interpolate(bilinear, align_corners=False), looped per output pixel."""
  n, h, w, c = x.shape
  out = np.zeros((n, size[0], size[1], c))

  def taps(d, n_in, n_out):
    src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = min(int(np.floor(src)), n_in - 1)
    return lo, min(lo + 1, n_in - 1), src - lo

  for y in range(size[0]):
    y0, y1, fy = taps(y, h, size[0])
    for x_ in range(size[1]):
      x0, x1, fx = taps(x_, w, size[1])
      out[:, y, x_] = (1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1]) + fy * (
          (1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]
      )
  return out


def np_soft_iou(norm_cam, feature, halve_bg=True):
  """get_seed's IoU map [B, h*w, C]: each pixel's affinity row against each class map."""
  b, h, w, c = norm_cam.shape
  iou = np.zeros((b, h * w, c))
  for n in range(b):
    f = np_l2_normalize(feature[n].reshape(h * w, -1))
    cam = norm_cam[n].reshape(h * w, c).astype(np.float64)
    for i in range(h * w):
      corr = np.array([max(float(f[i] @ f[j]), 0.0) for j in range(h * w)])
      for k in range(c):
        inter = sum(corr[j] * cam[j, k] for j in range(h * w))
        union = corr.sum() + cam[:, k].sum() - inter
        iou[n, i, k] = inter / union
  if halve_bg:
    iou[..., 0] *= 0.5
  return iou


def np_structure_seeds(norm_cam, feature, mask, halve_bg=True):
  b, h, w, c = norm_cam.shape
  iou = np_soft_iou(norm_cam, feature, halve_bg)
  seeds = np.zeros((b, h * w, c))
  for n in range(b):
    for i in range(h * w):
      seeds[n, i, int(np.argmax(iou[n, i]))] = 1.0
  return seeds.reshape(b, h, w, c) * np.broadcast_to(mask, (b, h, w, c)), iou


def np_class_prototypes(seeds, feature):
  b, h, w, c = seeds.shape
  protos = np.zeros((b, c, feature.shape[-1]))
  for n in range(b):
    for k in range(c):
      for y in range(h):
        for x in range(w):
          protos[n, k] += seeds[n, y, x, k] * feature[n, y, x]
  return protos / (h * w)  # SIPE: adaptive_avg_pool2d over all positions, not the seed area


def np_cosine_cam(feature, protos):
  """ReLU(torch.cosine_similarity(f, p, eps=1e-8)) = relu(f.p / (max(|f|,eps) max(|p|,eps)))."""
  b, h, w, _ = feature.shape
  c = protos.shape[1]
  out = np.zeros((b, h, w, c))
  for n in range(b):
    for k in range(c):
      p = protos[n, k].astype(np.float64)
      for y in range(h):
        for x in range(w):
          f = feature[n, y, x].astype(np.float64)
          cos = f @ p / (max(np.linalg.norm(f), 1e-8) * max(np.linalg.norm(p), 1e-8))
          out[n, y, x, k] = max(cos, 0.0)
  return out


def np_multilabel_soft_margin(score, labels):
  z, y = score.astype(np.float64), labels.astype(np.float64)
  # log sigma(z) = -log(1 + e^-z), log(1 - sigma(z)) = -log(1 + e^z), via logaddexp for large |z|.
  return -np.mean(y * -np.logaddexp(0.0, -z) + (1 - y) * -np.logaddexp(0.0, z))


def np_gsc_loss(norm_cam, is_cam):
  return np.mean(np.abs(norm_cam - np_max_normalize(is_cam)))


def np_sipe_maps(cam, hie, seed_feature, mask, mask_cam):
  norm_cam = np_norm_cam_with_background(cam)
  if mask_cam:
    norm_cam = norm_cam * mask
  seeds, iou = np_structure_seeds(norm_cam, seed_feature, mask)
  protos = np_class_prototypes(seeds, hie.astype(np.float64))
  return {
      "norm_cam": norm_cam,
      "seeds": seeds,
      "prototypes": protos,
      "is_cam": np_cosine_cam(hie, protos),
  }, iou


# ------------------------------------------------------------------ helpers


def rand(shape, seed, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def make_inputs(seed):
  """cam, hie, x4, valid, labels with one absent class per image and a padded column in image 1."""
  cam = rand((B, H, W, C - 1), seed)
  hie = rand((B, H, W, D), seed + 1)
  x4 = rand((B, H, W, 8), seed + 2)
  valid = np.ones((B, H, W), np.float32)
  valid[1, :, -1] = 0
  labels = np.array([[1, 0, 1], [0, 1, 1]], np.float32)
  return cam, hie, x4, valid, labels


def assert_clear_argmax(iou, gap=1e-4):
  # float32 vs float64 may only disagree on near ties; make sure the random inputs have none.
  top2 = np.sort(iou, axis=-1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > gap, "near-tie in the soft IoU: change the seed"


def close(got, want, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ normalisation and masks


def test_max_normalize():
  x = np.abs(rand((B, H, W, C), 0))
  close(sipe.max_normalize(jnp.asarray(x)), np_max_normalize(x))
  # Per image and channel: each (b, c) slice peaks just under 1.
  close(np.asarray(sipe.max_normalize(jnp.asarray(x))).max(axis=(1, 2)), 1 / (1 + EPS / x.max(axis=(1, 2))))


def test_norm_cam_with_background():
  cam = rand((B, H, W, C - 1), 1)
  got = np.asarray(sipe.norm_cam_with_background(jnp.asarray(cam)))
  assert got.shape == (B, H, W, C)
  close(got, np_norm_cam_with_background(cam))
  assert got.min() >= 0 and got.max() <= 1


def test_norm_cam_all_negative_class_is_zero_and_background_one():
  # A class whose CAM is negative everywhere: ReLU makes it 0, 0/(0+eps) stays 0, and where no
  # class fires the background is 1.
  cam = -np.abs(rand((1, H, W, C - 1), 2)) - 0.1
  got = np.asarray(sipe.norm_cam_with_background(jnp.asarray(cam)))
  np.testing.assert_array_equal(got[..., 1:], 0.0)
  np.testing.assert_array_equal(got[..., 0], 1.0)


def test_label_mask():
  _, _, _, valid, labels = make_inputs(3)
  got = np.asarray(sipe.label_mask(jnp.asarray(valid), jnp.asarray(labels)))
  np.testing.assert_array_equal(got, np_label_mask(valid, labels))
  # Background is on wherever the pixel is real, whatever the labels.
  np.testing.assert_array_equal(got[..., 0], valid)


# ------------------------------------------------------------------ features


def test_l2_normalize():
  f = rand((B, H, W, D), 4, scale=3.0)
  got = np.asarray(sipe.l2_normalize(jnp.asarray(f)))
  close(got, np_l2_normalize(f))
  close(np.linalg.norm(got, axis=-1), np.linalg.norm(f, axis=-1) / (np.linalg.norm(f, axis=-1) + EPS))


def test_l2_normalize_zero_vector_value_and_grad():
  f = jnp.zeros((1, 1, 1, D))
  np.testing.assert_array_equal(np.asarray(sipe.l2_normalize(f)), 0.0)
  g = np.asarray(jax.grad(lambda v: jnp.sum(sipe.l2_normalize(v) * jnp.arange(D)))(f))
  assert np.isfinite(g).all()
  # At 0 the map is v / eps: gradient of sum(w * v/eps) is w / eps.
  close(g[0, 0, 0], np.arange(D) / EPS, rtol=1e-4)


def test_hierarchical_feature_matches_reference():
  # SIPE's side outputs: stride 4, 8, 16, 16 of a 80px crop -> 20, 10, 5, 5, resized to 5x5.
  shapes = [(B, 20, 20, 3), (B, 10, 10, 4), (B, 5, 5, 5), (B, 5, 5, 2)]
  sides = [rand(s, 10 + i) for i, s in enumerate(shapes)]
  got = np.asarray(
      sipe.hierarchical_feature([jnp.asarray(s) for s in sides], (5, 5), image_ops.resize_bilinear)
  )
  want = np.concatenate([np_resize_bilinear(np_l2_normalize(s), (5, 5)) for s in sides], axis=-1)
  assert got.shape == (B, 5, 5, 14)
  close(got, want)
  # Blocks resized from a finer map average unit vectors (norm <= 1); native-size blocks keep 1.
  bounds = np.cumsum([0] + [s[-1] for s in shapes])
  norms = [np.linalg.norm(got[..., a:b], axis=-1) for a, b in zip(bounds[:-1], bounds[1:])]
  for n in norms[:2]:
    assert n.max() <= 1 + 1e-6
  for n in norms[2:]:
    close(n, 1.0, rtol=1e-4)


def test_hierarchical_feature_norm_is_sqrt_of_side_count():
  # All four sides at the target size: each block is a unit vector, so |F_hie|^2 = 4 (|F_hie| = 2,
  # docs/method.md 2.1), i.e. the squared norm counts the sides.
  sides = [jnp.asarray(rand((B, H, W, d), 20 + d)) for d in (3, 4, 5, 2)]
  got = np.asarray(sipe.hierarchical_feature(sides, (H, W), image_ops.resize_bilinear))
  close((got.astype(np.float64) ** 2).sum(-1), 4.0, rtol=1e-4)
  close(np.linalg.norm(got, axis=-1), 2.0, rtol=1e-4)


# ------------------------------------------------------------------ seeds


def test_structure_seeds_matches_reference():
  cam, _, x4, valid, labels = make_inputs(30)
  mask = np_label_mask(valid, labels)
  norm_cam = np_norm_cam_with_background(cam) * mask
  want, iou = np_structure_seeds(norm_cam, x4, mask)
  assert_clear_argmax(iou)
  got = np.asarray(
      sipe.structure_seeds(
          jnp.asarray(norm_cam, jnp.float32), jnp.asarray(x4), jnp.asarray(mask, jnp.float32)
      )
  )
  np.testing.assert_array_equal(got, want)
  # One-hot on real pixels, nothing on the padded column or on absent classes.
  np.testing.assert_array_equal(got.sum(-1), valid)
  np.testing.assert_array_equal(got[0, ..., 2], 0)
  np.testing.assert_array_equal(got[1, ..., 1], 0)


def test_structure_seeds_unmasked_cam_matches_reference():
  # Inference path: the CAM is not masked before seeding, only the seeds are.
  cam, _, x4, valid, labels = make_inputs(40)
  mask = np_label_mask(valid, labels)
  norm_cam = np_norm_cam_with_background(cam)
  want, iou = np_structure_seeds(norm_cam, x4, mask)
  assert_clear_argmax(iou)
  got = sipe.structure_seeds(
      jnp.asarray(norm_cam, jnp.float32), jnp.asarray(x4), jnp.asarray(mask, jnp.float32)
  )
  np.testing.assert_array_equal(np.asarray(got), want)


def halving_case():
  """2x4 map, two orthogonal feature blocks (columns 0-1 and 2-3). Left: background 0.9, class 1
  0.4; right: background 1.0, class 1 absent; class 2 weak everywhere."""
  feature = np.zeros((1, 2, 4, 3), np.float32)
  feature[0, :, :2, 0] = 1
  feature[0, :, 2:, 1] = 1
  norm_cam = np.zeros((1, 2, 4, 3), np.float32)
  norm_cam[0, :, :2, 0] = 0.9
  norm_cam[0, :, 2:, 0] = 1.0
  norm_cam[0, :, :2, 1] = 0.4
  norm_cam[0, :, :, 2] = 0.1
  return norm_cam, feature


def test_structure_seeds_background_halving_flips_argmax():
  norm_cam, feature = halving_case()
  mask = np.ones((1, 2, 4, 3), np.float32)
  with_halving, iou = np_structure_seeds(norm_cam, feature, mask, halve_bg=True)
  without, iou_raw = np_structure_seeds(norm_cam, feature, mask, halve_bg=False)
  # The construction: on the left the background's IoU (0.45) beats class 1 (0.40) only unhalved;
  # on the right it wins either way (0.53 halved to 0.26 against 0.09).
  assert (without[0, :, :2, 0] == 1).all() and (with_halving[0, :, :2, 1] == 1).all()
  assert (without[0, :, 2:, 0] == 1).all() and (with_halving[0, :, 2:, 0] == 1).all()
  assert_clear_argmax(iou, gap=1e-2)
  got = np.asarray(sipe.structure_seeds(jnp.asarray(norm_cam), jnp.asarray(feature), jnp.asarray(mask)))
  np.testing.assert_array_equal(got, with_halving)


def test_structure_seeds_mask_applies_after_argmax():
  # Masking class 1 out of the seeds (not of the CAM) leaves the left pixels with no seed at all
  # rather than handing them to the runner-up.
  norm_cam, feature = halving_case()
  mask = np.ones((1, 2, 4, 3), np.float32)
  mask[..., 1] = 0
  got = np.asarray(sipe.structure_seeds(jnp.asarray(norm_cam), jnp.asarray(feature), jnp.asarray(mask)))
  np.testing.assert_array_equal(got[0, :, :2], 0)
  np.testing.assert_array_equal(got[0, :, 2:, 0], 1)
  # A broadcastable [B, h, w, 1] mask works too (the valid mask alone).
  valid = np.ones((1, 2, 4, 1), np.float32)
  valid[0, 0, 0] = 0
  got = np.asarray(sipe.structure_seeds(jnp.asarray(norm_cam), jnp.asarray(feature), jnp.asarray(valid)))
  np.testing.assert_array_equal(got.sum(-1), valid[..., 0])


# ------------------------------------------------------------------ prototypes and IS-CAM


def test_class_prototypes_matches_reference():
  rng = np.random.default_rng(50)
  seeds = np.eye(C, dtype=np.float32)[rng.integers(0, C, (B, H, W))]
  seeds[1, ..., 2] = 0  # an absent class
  feature = rand((B, H, W, D), 51)
  got = np.asarray(sipe.class_prototypes(jnp.asarray(seeds), jnp.asarray(feature)))
  want = np_class_prototypes(seeds, feature)
  close(got, want)
  np.testing.assert_array_equal(got[1, 2], 0.0)
  # Denominator h*w, not the seed area: the prototype is the seed-area mean scaled by area/hw.
  area = seeds[0, ..., 1].sum()
  assert 0 < area < H * W
  seed_mean = feature[0][seeds[0, ..., 1] == 1].mean(0)
  close(got[0, 1], seed_mean * area / (H * W))


def test_cosine_cam_matches_reference():
  feature = rand((B, H, W, D), 60)
  protos = rand((B, C, D), 61)
  got = np.asarray(sipe.cosine_cam(jnp.asarray(feature), jnp.asarray(protos)))
  close(got, np_cosine_cam(feature, protos))
  assert got.min() >= 0 and got.max() <= 1 + 1e-6 and (got == 0).any()


def test_cosine_cam_zero_prototype_is_zero_with_zero_finite_grad():
  feature = jnp.asarray(rand((B, H, W, D), 62))
  protos = jnp.asarray(rand((B, C, D), 63)).at[0, 2].set(0.0)
  got = np.asarray(sipe.cosine_cam(feature, protos))
  np.testing.assert_array_equal(got[0, ..., 2], 0.0)
  close(got, np_cosine_cam(np.asarray(feature), np.asarray(protos)))
  gp, gf = jax.grad(lambda p, f: jnp.sum(sipe.cosine_cam(f, p)), argnums=(0, 1))(protos, feature)
  gp, gf = np.asarray(gp), np.asarray(gf)
  # A plain norm would give 0/0 = NaN here (d|p|/dp at p = 0); safe_norm gives torch's 0.
  assert np.isfinite(gp).all() and np.isfinite(gf).all()
  np.testing.assert_array_equal(gp[0, 2], 0.0)
  assert np.abs(gp[0, 1]).max() > 0


def test_plain_norm_would_nan_at_zero_prototype():
  # Why safe_norm exists: jnp.linalg.norm's gradient at the zero vector is NaN.
  g = jax.grad(lambda p: jnp.linalg.norm(p))(jnp.zeros(D))
  assert np.isnan(np.asarray(g)).any()
  g = jax.grad(lambda p: sipe.safe_norm(p))(jnp.zeros(D))
  np.testing.assert_array_equal(np.asarray(g), 0.0)


# ------------------------------------------------------------------ losses


def test_multilabel_soft_margin_matches_formula():
  score = rand((B, C - 1), 70, scale=2.0)
  labels = (np.random.default_rng(71).random((B, C - 1)) > 0.5).astype(np.float32)
  close(
      sipe.multilabel_soft_margin(jnp.asarray(score), jnp.asarray(labels)),
      np_multilabel_soft_margin(score, labels),
  )
  # Direct form at moderate logits, as written in the formula.
  z, y = score.astype(np.float64), labels.astype(np.float64)
  s = 1 / (1 + np.exp(-z))
  close(
      sipe.multilabel_soft_margin(jnp.asarray(score), jnp.asarray(labels)),
      -np.mean(y * np.log(s) + (1 - y) * np.log(1 - s)),
  )


def test_multilabel_soft_margin_large_logits_stable():
  score = np.array([[200.0, -200.0, 1e4, -1e4], [30.0, -30.0, 0.0, 88.0]], np.float32)
  labels = np.array([[1, 0, 0, 1], [0, 1, 1, 1]], np.float32)
  f = lambda s: sipe.multilabel_soft_margin(s, jnp.asarray(labels))
  got = float(f(jnp.asarray(score)))
  assert np.isfinite(got)
  close(got, np_multilabel_soft_margin(score, labels))  # wrong-sign 1e4 logits cost 1e4 each
  g = np.asarray(jax.grad(f)(jnp.asarray(score)))
  assert np.isfinite(g).all()
  # d/dz = (sigma(z) - y) / n: saturates at -1/n, 0 or +1/n (tanh form: no overflow in exp).
  sigma = 0.5 * (1 + np.tanh(score.astype(np.float64) / 2))
  close(g, (sigma - labels) / labels.size, atol=1e-7)


def test_gsc_loss_matches_reference():
  norm_cam = np.abs(rand((B, H, W, C), 80))
  is_cam = np.abs(rand((B, H, W, C), 81))
  is_cam[1, ..., 3] = 0  # an absent class: 0/(0+eps) stays 0 and still counts in the mean
  close(sipe.gsc_loss(jnp.asarray(norm_cam), jnp.asarray(is_cam)), np_gsc_loss(norm_cam, is_cam))


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize("mask_cam", [True, False])
def test_sipe_maps_matches_reference(mask_cam):
  cam, hie, x4, valid, labels = make_inputs(90)
  mask = np_label_mask(valid, labels)
  want, iou = np_sipe_maps(cam, hie, x4, mask, mask_cam)
  assert_clear_argmax(iou)
  got = sipe.sipe_maps(
      jnp.asarray(cam), jnp.asarray(hie), jnp.asarray(x4), jnp.asarray(mask, jnp.float32), mask_cam=mask_cam
  )
  assert set(got) == {"norm_cam", "seeds", "prototypes", "is_cam"}
  close(got["norm_cam"], want["norm_cam"])
  np.testing.assert_array_equal(np.asarray(got["seeds"]), want["seeds"])
  close(got["prototypes"], want["prototypes"])
  close(got["is_cam"], want["is_cam"])
  # Absent classes: zero prototype, IS-CAM exactly 0.
  np.testing.assert_array_equal(np.asarray(got["is_cam"])[0, ..., 2], 0.0)
  np.testing.assert_array_equal(np.asarray(got["is_cam"])[1, ..., 1], 0.0)
  if mask_cam:
    np.testing.assert_array_equal(np.asarray(got["norm_cam"])[1, :, -1], 0.0)
  # And the loss on top.
  close(sipe.gsc_loss(got["norm_cam"], got["is_cam"]), np_gsc_loss(want["norm_cam"], want["is_cam"]))


def test_sipe_maps_inference_uses_hie_for_seeds():
  # Inference passes F_hie as the seed feature; the composed reference must still agree.
  cam, hie, _, valid, labels = make_inputs(95)
  mask = np_label_mask(valid, labels)
  want, iou = np_sipe_maps(cam, hie, hie, mask, mask_cam=False)
  assert_clear_argmax(iou)
  got = sipe.sipe_maps(
      jnp.asarray(cam), jnp.asarray(hie), jnp.asarray(hie), jnp.asarray(mask, jnp.float32), mask_cam=False
  )
  np.testing.assert_array_equal(np.asarray(got["seeds"]), want["seeds"])
  close(got["is_cam"], want["is_cam"])


# ------------------------------------------------------------------ gradient routing


def routing_inputs():
  cam, hie, x4, valid, labels = make_inputs(100)
  mask = jnp.asarray(np_label_mask(valid, labels), jnp.float32)
  return jnp.asarray(cam), jnp.asarray(hie), jnp.asarray(x4), mask


def test_seeds_carry_no_gradient():
  cam, hie, x4, mask = routing_inputs()
  weights = jnp.asarray(rand((B, H, W, C), 101))
  seeds_sum = lambda c, f: jnp.sum(sipe.sipe_maps(c, hie, f, mask)["seeds"] * weights)
  g_cam, g_x4 = jax.grad(seeds_sum, argnums=(0, 1))(cam, x4)
  np.testing.assert_array_equal(np.asarray(g_cam), 0.0)
  np.testing.assert_array_equal(np.asarray(g_x4), 0.0)
  # The same for structure_seeds called on its own with a differentiable CAM_norm.
  g = jax.grad(lambda nc: jnp.sum(sipe.structure_seeds(nc, x4, mask) * weights))(
      sipe.norm_cam_with_background(cam)
  )
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_is_cam_depends_on_hie_not_cam():
  cam, hie, x4, mask = routing_inputs()
  weights = jnp.asarray(rand((B, H, W, C), 102))
  is_sum = lambda c, h, f: jnp.sum(sipe.sipe_maps(c, h, f, mask)["is_cam"] * weights)
  g_cam, g_hie, g_x4 = jax.grad(is_sum, argnums=(0, 1, 2))(cam, hie, x4)
  np.testing.assert_array_equal(np.asarray(g_cam), 0.0)
  np.testing.assert_array_equal(np.asarray(g_x4), 0.0)
  g_hie = np.asarray(g_hie)
  assert np.isfinite(g_hie).all() and np.abs(g_hie).max() > 1e-3


def test_gsc_gradient_routing():
  cam, hie, x4, mask = routing_inputs()

  def gsc(c, h):
    out = sipe.sipe_maps(c, h, x4, mask)
    return sipe.gsc_loss(out["norm_cam"], out["is_cam"])

  g_cam, g_hie = jax.grad(gsc, argnums=(0, 1))(cam, hie)
  g_cam, g_hie = np.asarray(g_cam), np.asarray(g_hie)
  assert np.isfinite(g_cam).all() and np.isfinite(g_hie).all()
  assert np.abs(g_cam).max() > 0 and np.abs(g_hie).max() > 0

  # cam reaches L_GSC only through CAM_norm: freezing IS-CAM leaves its gradient unchanged.
  is_cam = sipe.sipe_maps(cam, hie, x4, mask)["is_cam"]
  g_cam_frozen = jax.grad(lambda c: sipe.gsc_loss(sipe.norm_cam_with_background(c) * mask, is_cam))(cam)
  close(g_cam, np.asarray(g_cam_frozen), rtol=1e-6, atol=1e-9)

  # hie's gradient is the real derivative: central difference along a random direction
  # (seeds are piecewise constant in hie, and hie does not enter them here).
  v = jnp.asarray(rand(hie.shape, 103))
  eps = 1e-3
  fd = (float(gsc(cam, hie + eps * v)) - float(gsc(cam, hie - eps * v))) / (2 * eps)
  np.testing.assert_allclose(float(jnp.sum(g_hie * v)), fd, rtol=2e-2, atol=1e-4)


def test_structure_seeds_in_row_blocks_equal_the_whole_affinity(monkeypatch):
  """Above SEED_BLOCK positions the affinity is computed a block of rows at a time (a ragged last
  block included): the same products and seeds as the whole [hw, hw] matrix."""
  rng = np.random.default_rng(5)
  f = jnp.asarray(rng.normal(size=(2, 37, 6)), jnp.float32)
  cams = jnp.asarray(rng.uniform(size=(2, 37, 3)), jnp.float32)
  whole = sipe._affinity_products(f, cams)
  monkeypatch.setattr(sipe, "SEED_BLOCK", 8)  # 5 blocks, the last holding 5 rows
  blocked = sipe._affinity_products(f, cams)
  for a, b in zip(whole, blocked):
    close(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  cam, _, x4, valid, labels = make_inputs(30)
  mask = np_label_mask(valid, labels)
  norm_cam = np_norm_cam_with_background(cam) * mask
  want, _ = np_structure_seeds(norm_cam, x4, mask)
  got = sipe.structure_seeds(jnp.asarray(norm_cam, jnp.float32), jnp.asarray(x4), jnp.asarray(mask, jnp.float32))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_structure_seeds_never_hold_the_whole_affinity():
  """Two views of 125x94 positions (a VOC image at scale 2.0, OS8): the whole affinity would be
  2 x 11,750^2 float32 = 1.1 GB (2.4 GB peak RSS measured that way); in row blocks the process
  peaks far lower. Measured in a fresh process (XLA's CPU memory analysis does not count it)."""
  import subprocess
  import sys

  code = (
      "import jax, jax.numpy as jnp\n"
      "from cpal_jax.method import sipe\n"
      "k = jax.random.split(jax.random.key(0), 2)\n"
      "a = (jax.random.uniform(k[0], (2, 125, 94, 3)), jax.random.normal(k[1], (2, 125, 94, 64)), jnp.ones((2, 125, 94, 3)))\n"
      "jax.jit(sipe.structure_seeds)(*a).block_until_ready()\n"
      # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss across fork and exec (a large
      # pytest process would be measured), while VmHWM belongs to this program's own memory map.
      "print([int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
  )
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
  peak_mb = int(r.stdout.split()[-1])
  assert peak_mb < 900, peak_mb
