"""PPC (docs/method.md 4) against plain-numpy float64 references and a line-by-line torch port of
usr922/wseg's contrast loss; gradient routing on the CAM network; the ppc train step on 1 vs 8
devices and through the command line.

The numpy references loop over images, classes and pixels and share nothing with the jnp code but
the formulas. NHWC throughout; channel 0 of C-channel maps is background.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpal_jax.method import objectives, ppc
from cpal_jax.models import cam_net
from test_cli import run_cli
from test_image_ops import np_bilinear
from test_train import _eight_vs_one, tiny_config

EPS = 1e-5
T = 0.1


def f64(x):
  return np.asarray(x, np.float64)


def cfg(**overrides):
  c = ppc.default_config()
  for k, v in overrides.items():
    c[k] = v
  return c


def close(got, want, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ numpy references


def np_minmax(cam):
  x = np.maximum(f64(cam), 0.0)
  out = np.empty_like(x)
  for b in range(x.shape[0]):
    for k in range(x.shape[-1]):
      m = x[b, :, :, k]
      mn, mx = m.min(), m.max()
      out[b, :, :, k] = (np.where(m < mn + EPS, 0.0, m) - mn - EPS) / (mx - mn + EPS)
  return out


def np_class_scores(cam, norm, bg, thr=0.2):
  if norm == "minmax":
    fg = np_minmax(cam)
  else:
    x = np.maximum(f64(cam), 0.0)
    fg = x / (x.max(axis=(1, 2), keepdims=True) + EPS)
  b = np.full(fg.shape[:3] + (1,), thr) if bg == "constant" else 1.0 - fg.max(-1, keepdims=True)
  return np.concatenate([b, fg], -1)


def np_pseudo_labels(scores, labels):
  b, h, w, _ = scores.shape
  out = np.zeros((b, h, w), np.int64)
  for i in range(b):
    allowed = [0] + [1 + n for n in range(labels.shape[1]) if labels[i, n] > 0]
    for y in range(h):
      for x in range(w):
        out[i, y, x] = max(allowed, key=lambda c: (scores[i, y, x, c], -c))
  return out


def np_normalize(v):
  return v / max(np.linalg.norm(v), 1e-12)


def np_prototypes(scores, feats, k, eligible=None):
  c, d = scores.shape[-1], feats.shape[-1]
  s_all, f_all = f64(scores).reshape(-1, c), f64(feats).reshape(-1, d)
  protos, valid = np.zeros((c, d)), np.zeros(c, bool)
  for n in range(c):
    s = s_all[:, n].copy()
    if eligible is not None:
      s[~eligible.reshape(-1)] = -np.inf
    order = np.argsort(-s, kind="stable")[:k]  # ties: lower index first
    order = [i for i in order if s[i] > -np.inf]
    den = sum(s[i] for i in order)
    if order and den != 0:
      protos[n] = np_normalize(sum(s[i] * f_all[i] for i in order) / den)
      valid[n] = True
  return protos, valid


def np_info_nce(f, protos, ok, pos):
  out = np.zeros(len(f))
  for i in range(len(f)):
    logits = [f64(f[i]) @ protos[c] / T for c in range(len(protos)) if ok[c]]
    out[i] = -np.log(np.exp(f64(f[i]) @ protos[pos[i]] / T) / np.sum(np.exp(logits)))
  return out


def np_semi_hard(f, protos, pos, skip, count):
  out = np.zeros(len(f))
  for i in range(len(f)):
    sims = np.array([f64(f[i]) @ protos[c] for c in range(len(protos))])
    negs = sims[np.argsort(-sims, kind="stable")][skip : skip + count]
    a = np.exp(sims[pos[i]] / T)
    out[i] = -np.log(a / (a + np.exp(negs / T).sum()))
  return out


def np_hard_selection(pos, sim, eligible, u, num_classes):
  rand, hard, n = np.zeros(len(pos), bool), np.zeros(len(pos), bool), np.zeros(num_classes, int)
  for c in range(num_classes):
    members = [i for i in range(len(pos)) if eligible[i] and pos[i] == c]
    n[c] = len(members)
    half, pool = len(members) // 2, int(len(members) * 0.6)
    by_u = sorted(members, key=lambda i: (u[i], i))
    by_sim = sorted(members, key=lambda i: (sim[i], i))
    rand[by_u[:half]] = True
    hard[by_sim[pool - half : pool]] = True
  return rand, hard, n


def np_intra(per_pixel, pos, rand, hard, n):
  total, classes = 0.0, 0
  for c in range(len(n)):
    if n[c] == 0:
      continue
    classes += 1
    if n[c] < 2:
      continue
    picked = [per_pixel[i] for i in range(len(pos)) if pos[i] == c and rand[i]]
    picked += [per_pixel[i] for i in range(len(pos)) if pos[i] == c and hard[i]]
    total += np.mean(picked)
  return total / max(classes, 1)


def np_seam_max_norm(cam):
  x = np.maximum(f64(cam), 0.0)
  mn, mx = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
  return np.maximum(x - mn - EPS, 0.0) / (mx - mn + EPS)


def rand(shape, seed, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def unit(shape, seed):
  x = rand(shape, seed)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------ pseudo labels and prototypes


@pytest.mark.parametrize(
    "norm,bg", [("minmax", "constant"), ("max", "one_minus_max"), ("minmax", "one_minus_max")]
)
def test_class_scores_and_pseudo_labels(norm, bg):
  cam = rand((3, 5, 4, 6), 0)
  cam[1, ..., 2] = -np.abs(cam[1, ..., 2])  # an all-negative class: ReLU gives a flat zero map
  labels = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32)
  c = cfg(pseudo_norm=norm, pseudo_bg=bg)
  scores = ppc.class_scores(jnp.asarray(cam), c)
  want = np_class_scores(cam, norm, bg)
  close(scores, want)
  pl = ppc.pseudo_labels(jnp.asarray(want, jnp.float32), jnp.asarray(labels))
  np.testing.assert_array_equal(pl, np_pseudo_labels(want, labels))
  assert np.all(np.asarray(pl)[2] == 0)  # an image without labels is all background


def test_minmax_zeroes_the_minimum_below_zero():
  cam = np.zeros((1, 2, 2, 1), np.float32)
  cam[0, 0, 0, 0] = 2.0
  got = np.asarray(ppc.minmax_normalize(jnp.asarray(cam)))[0, ..., 0]
  close(got[0, 0], (2.0 - EPS) / (2.0 + EPS))
  close(got[1, 1], -EPS / (2.0 + EPS), rtol=1e-4)  # the reference's slightly negative floor


@pytest.mark.parametrize("k", [1, 3, 7])
def test_prototypes_top_k_over_the_batch(k):
  scores = rand((2, 4, 3, 5), 1)
  scores[..., 0] = 0.2  # the constant background: ties go to the first pixels of the batch
  feats = np.abs(rand((2, 4, 3, 6), 2))
  protos, valid = ppc.prototypes(jnp.asarray(scores), jnp.asarray(feats), k)
  want, want_valid = np_prototypes(scores, feats, k)
  close(protos, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(valid, want_valid)
  want_bg = np_normalize(f64(feats).reshape(-1, 6)[:k].mean(0))
  close(protos[0], want_bg, rtol=1e-5, atol=1e-6)


def test_prototypes_eligible_mask_and_label_mask():
  scores = rand((2, 3, 3, 4), 3)
  feats = rand((2, 3, 3, 5), 4)
  labels = jnp.asarray([[1, 0, 0], [1, 0, 1]], jnp.float32)
  eligible = np.random.default_rng(5).random((2, 3, 3)) > 0.3
  ranked = ppc.ranking_scores(jnp.asarray(scores), labels, cfg(proto_label_mask=True))
  protos, valid = ppc.prototypes(ranked, jnp.asarray(feats), 4, jnp.asarray(eligible))
  masked = np.where(np.asarray([[1, 1, 0, 0], [1, 1, 0, 1]], bool)[:, None, None], scores, -np.inf)
  want, want_valid = np_prototypes(masked, feats, 4, eligible)
  close(protos, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(valid, want_valid)
  assert not bool(valid[2]) and np.all(np.asarray(protos[2]) == 0)  # class 2 is in no image


def test_ranking_scores_one_minus_max_background():
  scores = rand((2, 3, 3, 4), 6)
  got = ppc.ranking_scores(jnp.asarray(scores), jnp.ones((2, 3)), cfg(proto_bg="one_minus_max"))
  close(np.asarray(got)[..., 0], 1.0 - scores[..., 1:].max(-1))
  close(np.asarray(got)[..., 1:], scores[..., 1:])


def test_top_k_count_and_view2_size():
  assert ppc.top_k_count(16, 16, 1 / 8) == 32  # 128 px view, stride 8: the reference's 32
  assert ppc.top_k_count(2, 2, 1 / 8) == 1
  c = cfg()
  assert ppc.view2_size((448, 448), 8, c) == (128, 128)
  assert ppc.view2_size((96, 96), 8, c) == (24, 24)
  assert ppc.view2_size((20, 20), 16, c) == (16, 16)  # at least one map cell
  assert ppc.view2_size((96, 96), 8, cfg(view2_size=40)) == (40, 40)


# ------------------------------------------------------------------ contrast terms


@pytest.mark.parametrize("invalid", [(), (3,)])
def test_info_nce(invalid):
  f, protos = unit((30, 8), 7), unit((6, 8), 8)
  ok = np.ones(6, bool)
  ok[list(invalid)] = False
  protos[~ok] = 0
  pos = np.random.default_rng(9).choice(np.flatnonzero(ok), 30)
  got = ppc.info_nce(jnp.asarray(f), jnp.asarray(protos), jnp.asarray(ok), jnp.asarray(pos), T)
  close(got, np_info_nce(f, f64(protos), ok, pos), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_classes", [21, 10, 3])
def test_semi_hard_prototype_mining(num_classes):
  # 21 classes: ranks 4-13 exactly; 10: ranks 4-10 (clipped); 3: no negatives left, loss 0.
  f, protos = unit((40, 8), 10), unit((num_classes, 8), 11)
  pos = np.random.default_rng(12).integers(0, num_classes, 40)
  ok = jnp.ones(num_classes, bool)
  got = ppc.semi_hard_nce(jnp.asarray(f), jnp.asarray(protos), ok, jnp.asarray(pos), T, 3, 10)
  close(got, np_semi_hard(f, f64(protos), pos, 3, 10), rtol=1e-4, atol=1e-5)


def test_semi_hard_positive_can_count_twice():
  # The pixel's own prototype ranked 4th: it is in the negatives as well as the numerator.
  protos = np.eye(6, dtype=np.float32)
  f = np.array([[0.6, 0.5, 0.4, 0.3, 0.2, 0.1]], np.float32)
  got = float(
      ppc.semi_hard_nce(jnp.asarray(f), jnp.asarray(protos), jnp.ones(6, bool), jnp.asarray([3]), T, 3, 10)[0]
  )
  pos = 0.3 / T
  negs = np.array([0.3, 0.2, 0.1]) / T
  close(got, np.log(np.exp(pos) + np.exp(negs).sum()) - pos)


def selection_inputs(seed, p=300, num_classes=6):
  """Pixels of classes 0-2, class 3 absent, class 4 with two pixels, class 5 with one."""
  rng = np.random.default_rng(seed)
  pos = rng.choice([0, 1, 2], p, p=[0.5, 0.3, 0.2])
  pos[0], pos[[10, 11]] = 5, 4
  sim = rng.random(p).astype(np.float32)
  eligible = rng.random(p) > 0.1
  eligible[[0, 10, 11]] = True
  return pos, sim, eligible


def test_hard_pixel_selection_against_reference():
  pos, sim, eligible = selection_inputs(13)
  u = np.asarray(jax.random.uniform(jax.random.key(0), pos.shape))
  got = ppc.hard_pixel_selection(
      jnp.asarray(pos), jnp.asarray(sim), jnp.asarray(eligible), jnp.asarray(u), 6, 0.5, 0.6
  )
  want = np_hard_selection(pos, sim, eligible, u, 6)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), w)
  rand_sel, hard_sel, n = (np.asarray(x) for x in got)
  for c in range(6):
    members = eligible & (pos == c)
    assert rand_sel[members].sum() == hard_sel[members].sum() == n[c] // 2
    assert not (rand_sel | hard_sel)[~eligible].any()
    if n[c] >= 2:  # semi-hard: inside the lowest 60%, above its hardest floor(0.6n) - n//2
      ranks = np.argsort(np.argsort(np.where(members, sim, np.inf), kind="stable"), kind="stable")
      pool = int(n[c] * 0.6)
      assert set(ranks[hard_sel & members]) == set(range(pool - n[c] // 2, pool))


def test_hard_pixel_selection_fixed_key_is_reproducible_and_random_part_varies():
  pos, sim, eligible = selection_inputs(14)
  args = (jnp.asarray(pos), jnp.asarray(sim), jnp.asarray(eligible))
  draw = lambda k: jax.random.uniform(jax.random.key(k), pos.shape)
  a, b, c = (ppc.hard_pixel_selection(*args, draw(k), 6, 0.5, 0.6) for k in (1, 1, 2))
  np.testing.assert_array_equal(a[0], b[0])
  assert np.any(np.asarray(a[0]) != np.asarray(c[0]))  # another key, another random half
  np.testing.assert_array_equal(a[1], c[1])  # the semi-hard half does not depend on the key


@pytest.mark.parametrize("n", [2, 3, 5, 10, 15, 25, 35, 50, 95, 100])
def test_semi_hard_pool_uses_integer_floor(n):
  # 0.6 n is exact for multiples of 5, where a float32 floor could be off by one.
  sim = np.random.default_rng(n).random(n).astype(np.float32)
  _, hard, _ = ppc.hard_pixel_selection(
      jnp.zeros(n, jnp.int32), jnp.asarray(sim), jnp.ones(n, bool), jnp.zeros(n), 1, 0.5, 0.6
  )
  ranks = np.argsort(np.argsort(sim))
  assert set(ranks[np.asarray(hard)]) == set(range(int(n * 0.6) - n // 2, int(n * 0.6)))


def test_intra_view_loss():
  pos, sim, eligible = selection_inputs(15)
  u = np.random.default_rng(16).random(len(pos)).astype(np.float32)
  per_pixel = np.random.default_rng(17).random(len(pos)).astype(np.float32)
  sel = ppc.hard_pixel_selection(
      jnp.asarray(pos), jnp.asarray(sim), jnp.asarray(eligible), jnp.asarray(u), 6, 0.5, 0.6
  )
  got = ppc.intra_view_loss(jnp.asarray(per_pixel), jnp.asarray(pos), *sel, 0.5)
  want = np_intra(per_pixel, pos, *np_hard_selection(pos, sim, eligible, u, 6))
  close(got, want, rtol=1e-5)


@pytest.mark.parametrize("size", [(12, 12), (3, 3)])
def test_equivariance_loss(size):
  cam1, cam2 = rand((2, 6, 6, 4), 18), rand((2, 3, 3, 4), 19)
  labels = np.array([[1, 0, 1, 1], [0, 1, 0, 0]], np.float32)
  got = ppc.equivariance_loss(jnp.asarray(cam1), jnp.asarray(cam2), jnp.asarray(labels), size)
  n1 = np_bilinear(np_seam_max_norm(cam1), size, True)
  n2 = np_seam_max_norm(np_bilinear(f64(cam2), size, True))
  m = labels[:, None, None, :]
  close(got, np.mean(np.abs(n1 * m - n2 * m)), rtol=1e-5)


def test_contrast_losses_ignore_padding_drops_padded_pixels():
  cam1, f1 = rand((2, 8, 8, 4), 20), np.abs(rand((2, 8, 8, 6), 21))
  cam2, f2 = rand((2, 4, 4, 4), 22), np.abs(rand((2, 4, 4, 6), 23))
  labels = jnp.asarray([[1, 0, 1, 0], [0, 1, 0, 0]], jnp.float32)
  valid = np.ones((2, 4, 4), np.float32)
  valid[:, 2:] = 0
  args = tuple(map(jnp.asarray, (cam1, f1, cam2, f2))) + (labels, jax.random.key(0))
  full = ppc.contrast_losses(*args, cfg(), valid=jnp.asarray(valid))  # flag off: valid unused
  none = ppc.contrast_losses(*args, cfg())
  masked = ppc.contrast_losses(*args, cfg(ignore_padding=True), valid=jnp.asarray(valid))
  close(full["ppc_nce"], float(none["ppc_nce"]))
  # Changing the padded pixels' inputs changes nothing once they are ignored.
  f2b = f2.copy()
  f2b[:, 2:] = np.abs(rand((2, 2, 4, 6), 24))
  cam2b = cam2.copy()
  cam2b[:, 2:] = rand((2, 2, 4, 4), 25)
  args_b = tuple(map(jnp.asarray, (cam1, f1, cam2b, f2b))) + (labels, jax.random.key(0))
  masked_b = ppc.contrast_losses(*args_b, cfg(ignore_padding=True), valid=jnp.asarray(valid))
  for k in masked:
    close(masked_b[k], float(masked[k]), rtol=1e-5)
  assert abs(float(masked["ppc_nce"]) - float(full["ppc_nce"])) > 1e-4


# ------------------------------------------------------------------ the reference, ported to torch


def torch_wseg_contrast(cam_rv1_down, cam_rv2_down, f_proj1, f_proj2, label_fg, u1, u2, bg_thres=0.2):
  """usr922/wseg contrast_train.py (SEAM variant), statement by statement, on the CPU.

  Two pins make it deterministic: torch.topk breaks the constant background's ties arbitrarily
  (here: the first k pixels of the batch, as jax.lax.top_k), and random.sample's pixel subsets
  come from the same uniform draws as the jnp code (first n//2 class members by u).
  Inputs are NCHW with the background at channel 0. Returns the six unweighted terms.
  """
  import torch
  import torch.nn.functional as F

  n = cam_rv1_down.shape[0]
  label = torch.cat((torch.ones((n, 1)), label_fg), dim=1).unsqueeze(2).unsqueeze(3)
  size = tuple(cam_rv2_down.shape[2:])
  f_proj1 = F.interpolate(f_proj1, size=size, mode="bilinear", align_corners=True)
  cam_rv1_down = F.interpolate(cam_rv1_down, size=size, mode="bilinear", align_corners=True)

  def view(cam_rv_down, f_proj):
    with torch.no_grad():
      fea = f_proj.detach()
      c_fea = fea.shape[1]
      cam_rv_down = F.relu(cam_rv_down.detach())
      n1, c1, h1, w1 = cam_rv_down.shape
      max1 = torch.max(cam_rv_down.view(n1, c1, -1), dim=-1)[0].view(n1, c1, 1, 1)
      min1 = torch.min(cam_rv_down.view(n1, c1, -1), dim=-1)[0].view(n1, c1, 1, 1)
      cam_rv_down[cam_rv_down < min1 + 1e-5] = 0.0
      cam_rv_down = (cam_rv_down - min1 - 1e-5) / (max1 - min1 + 1e-5)
      cam_rv_down[:, 0, :, :] = bg_thres
      scores = F.softmax(cam_rv_down * label, dim=1)
      pseudo_label = scores.argmax(dim=1, keepdim=True)
      fea = fea.permute(0, 2, 3, 1).reshape(-1, c_fea)
      k = h1 * w1 // 8
      top_values, top_indices = torch.topk(cam_rv_down.transpose(0, 1).reshape(c1, -1), k=k, dim=-1)
      top_indices[0] = torch.arange(k)  # pin the background's ties (see the docstring)
      prototypes = torch.zeros(c1, c_fea)
      for i in range(c1):
        top_fea = fea[top_indices[i]]
        prototypes[i] = torch.sum(top_values[i].unsqueeze(-1) * top_fea, dim=0) / torch.sum(top_values[i])
      prototypes = F.normalize(prototypes, dim=-1)
    n_f, c_f, h_f, w_f = f_proj.shape
    f = F.normalize(f_proj.permute(0, 2, 3, 1).reshape(n_f * h_f * w_f, c_f), dim=-1)
    return f, pseudo_label.reshape(-1), prototypes

  f_proj1, pseudo_label1, prototypes1 = view(cam_rv1_down, f_proj1)
  f_proj2, pseudo_label2, prototypes2 = view(cam_rv2_down, f_proj2)

  def nce(f, positives, negatives):
    a = torch.exp(torch.sum(f * positives, dim=-1) / 0.1)
    b = torch.sum(torch.exp(torch.matmul(f, negatives.transpose(0, 1)) / 0.1), dim=-1)
    return torch.mean(-1 * torch.log(a / b))

  loss_nce1 = nce(f_proj1, prototypes2[pseudo_label1], prototypes2)
  loss_nce2 = nce(f_proj2, prototypes1[pseudo_label2], prototypes1)
  loss_cross_nce2_1 = nce(f_proj1, prototypes1[pseudo_label2], prototypes1)
  loss_cross_nce2_2 = nce(f_proj2, prototypes2[pseudo_label1], prototypes2)

  def intra(f, pseudo_label, prototypes, u):
    npix = f.shape[0]
    positives = prototypes[pseudo_label]
    similarity = (torch.sum(f * positives, dim=-1) + 1) / 2.0
    a1 = torch.exp(torch.sum(f * positives, dim=-1) / 0.1)
    neg_scores = torch.matmul(f, prototypes.transpose(0, 1))
    with torch.no_grad():
      _, lower_indices = torch.topk(neg_scores, k=13, largest=True, dim=-1)
      lower_indices = lower_indices[:, 3:]
    negatives = prototypes.unsqueeze(0).repeat(npix, 1, 1)
    lower_negatives = negatives[torch.arange(npix).unsqueeze(1), lower_indices]
    negatives = torch.cat([positives.unsqueeze(1), lower_negatives], dim=1)
    a2 = torch.sum(
        torch.exp(torch.matmul(f.unsqueeze(1), negatives.transpose(1, 2)).squeeze(1) / 0.1), dim=-1
    )
    loss, classes = torch.zeros(1), 0
    exists = np.unique(pseudo_label.numpy()).tolist()
    for i_ in range(prototypes.shape[0]):
      if i_ not in exists:
        continue
      classes += 1
      a1_c, a2_c = a1[pseudo_label == i_], a2[pseudo_label == i_]
      sim_c, u_c = similarity[pseudo_label == i_], u[pseudo_label == i_]
      len_class = a1_c.shape[0]
      if len_class < 2:
        continue
      random_indices = torch.argsort(u_c, stable=True)[: len_class // 2]  # random.sample's stand-in
      _, lower = torch.topk(sim_c, k=int(len_class * 0.6), largest=False)
      lower = lower[int(len_class * 0.6) - len_class // 2 :]
      a1_s = torch.cat([a1_c[random_indices], a1_c[lower]], dim=0)
      a2_s = torch.cat([a2_c[random_indices], a2_c[lower]], dim=0)
      loss += torch.mean(-1 * torch.log(a1_s / a2_s))
    return loss / classes

  loss_intra1 = intra(f_proj1, pseudo_label1, prototypes1, u1)
  loss_intra2 = intra(f_proj2, pseudo_label2, prototypes2, u2)
  terms = (loss_nce1, loss_nce2, loss_cross_nce2_1, loss_cross_nce2_2, loss_intra1, loss_intra2)
  return [float(t) for t in terms]


def test_contrast_losses_match_the_torch_reference():
  torch = pytest.importorskip("torch")
  b, c = 2, 21  # 21 classes: the reference's top-13 prototype ranking needs at least 13
  rng = np.random.default_rng(30)
  # Positive CAMs (no flat ReLU regions, so no ties in the foreground top-k or the pixel ranks).
  cam1 = (np.abs(rand((b, 8, 8, c - 1), 31)) + 0.05).astype(np.float32)
  cam2 = (np.abs(rand((b, 4, 4, c - 1), 32)) + 0.05).astype(np.float32)
  f1, f2 = np.abs(rand((b, 8, 8, 16), 33)), np.abs(rand((b, 4, 4, 16), 34))
  labels = (rng.random((b, c - 1)) < 0.3).astype(np.float32)
  labels[:, :3] = 1
  key = jax.random.key(7)
  got = ppc.contrast_losses(*map(jnp.asarray, (cam1, f1, cam2, f2, labels)), key, cfg())
  k1, k2 = jax.random.split(key)
  u1, u2 = (torch.from_numpy(np.array(jax.random.uniform(k, (b * 16,)))) for k in (k1, k2))

  def nchw_with_bg(x):
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    return torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)

  nce1, nce2, cross1, cross2, intra1, intra2 = torch_wseg_contrast(
      nchw_with_bg(cam1),
      nchw_with_bg(cam2),
      torch.from_numpy(np.ascontiguousarray(np.moveaxis(f1, -1, 1))),
      torch.from_numpy(np.ascontiguousarray(np.moveaxis(f2, -1, 1))),
      torch.from_numpy(labels),
      u1,
      u2,
  )
  close(got["ppc_cross_proto"], (nce1 + nce2) / 2, rtol=1e-4)
  close(got["ppc_cross_label"], (cross1 + cross2) / 2, rtol=1e-4)
  close(got["ppc_intra"], (intra1 + intra2) / 2, rtol=1e-4)
  want = 0.1 * (nce1 + nce2) / 2 + 0.1 * (cross1 + cross2) / 2 + 0.1 * (intra1 + intra2) / 2
  close(got["ppc_nce"], want, rtol=1e-4)


# ------------------------------------------------------------------ on the network


def test_total_loss_gradients_reach_proj_head_and_classifier():
  config = tiny_config(**{"method.name": "ppc", "method.ppc.view2_size": 16})
  model = cam_net.from_config(config)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  # Random values in init's shapes: flax's init compiles a graph as big as the step's.
  rng = np.random.default_rng(1)
  shapes = jax.eval_shape(model.init, jax.random.key(1), x)
  fill = (
      lambda path, s: np.ones(s.shape, s.dtype)
      if path[-1].key in ("var", "scale")
      else rng.normal(0, 0.1, s.shape).astype(s.dtype)
  )
  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  labels = jnp.asarray([[1, 0, 0, 1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0, 1]] * 2, jnp.float32)
  stride = cam_net.output_stride(config)
  assert stride == 8 and cam_net.uses_proj_head(config) and cam_net.proj_dim(config) == 128

  def terms(params):
    v = {"params": params, "batch_stats": variables["batch_stats"]}
    out = model.apply(v, x)
    size = ppc.view2_size(x.shape[1:3], stride, config.method.ppc)
    x2, valid2 = ppc.second_view(x, jnp.ones(x.shape[:3]), size)
    out2 = model.apply(v, x2)
    view2 = {**out2, "features": out2["proj"], "valid": jnp.ones(out2["cam"].shape[:3]), "image_size": size}
    t, _ = objectives.compute_losses(
        config,
        out,
        out["proj"],
        labels,
        jnp.ones(out["cam"].shape[:3]),
        {},
        view2=view2,
        key=jax.random.key(2),
    )
    return jnp.stack([t["total"], t["ppc_nce"], t["er"]]), t

  @jax.jit
  def grads(params, cotangent):  # one compile; each cotangent picks one term
    _, vjp, t = jax.vjp(terms, params, has_aux=True)
    return vjp(cotangent)[0], t

  g, t = zip(*(grads(variables["params"], jnp.eye(3)[i]) for i in range(3)))  # total, nce, er
  t = t[0]
  assert all(np.isfinite(float(v)) for v in t.values())
  assert float(t["ppc_nce"]) > 0 and float(t["er"]) > 0
  norm = lambda i, head: float(jnp.abs(g[i][head]["kernel"]).sum())
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(g))
  assert norm(0, "proj") > 0 and norm(0, "classifier") > 0  # the total reaches both heads
  # The contrast terms train the features only (pseudo labels and prototypes are detached); the
  # equivariance term trains the CAM and never the projection.
  assert norm(1, "proj") > 0 and norm(1, "classifier") == 0
  assert norm(2, "classifier") > 0 and norm(2, "proj") == 0


def test_unknown_flags_are_errors():
  cam, f = jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 4))
  for bad in ({"pseudo_norm": "x"}, {"pseudo_bg": "x"}, {"proto_bg": "x"}, {"hard_pool_fraction": 0.4}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      ppc.contrast_losses(cam, f, cam, f, jnp.ones((1, 3)), jax.random.key(0), cfg(**bad))


@pytest.mark.slow
def test_ppc_train_steps_eight_devices_match_one(tmp_path):
  config = tiny_config(**{"method.name": "ppc", "method.ppc.view2_size": 32})
  _eight_vs_one(config, tmp_path, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_cli_runs_ppc(tmp_path):
  tiny = {
      "method.name": "ppc",
      "cam.scales": "(1.0,)",
      "data.image_size": 64,
      "data.num_train": 16,
      "data.num_eval": 8,
      "model.backbone": "resnet_tiny",
      "train.batch_size": 8,
      "train.num_steps": 2,
      "train.crop_size": 64,
      "train.resize_long": "(56,72)",
      "eval.batch_size": 8,
      "mesh.data": 1,
  }
  r = run_cli(f"--workdir={tmp_path}", *(f"--config.{k}={v}" for k, v in tiny.items()), timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(tmp_path, "summary.json")) as f:
    summary = json.load(f)
  assert summary["train_cam"]["steps"] == 2 and np.isfinite(summary["train_cam"]["final_loss"])
  assert np.isfinite(summary["seed_miou"]) and summary["thresholds"]["seed"] is not None
