"""SIPE (Chen et al., CVPR 2022): the base network CPAL extends (docs/method.md section 2).

Pure jnp functions over NHWC maps, so the CAM network, the CPAL branch and any other CAM model can
share them. Channel 0 of every C-channel map is background; foreground-only maps have C-1.
"""

import jax
import jax.numpy as jnp

NORM_EPS = 1e-5  # SIPE's epsilon for L2 norms and max-normalisation


def max_normalize(x: jnp.ndarray) -> jnp.ndarray:
  """x / (spatial max + 1e-5), per image and channel, on [B, H, W, C]."""
  return x / (jnp.max(x, axis=(1, 2), keepdims=True) + NORM_EPS)


def norm_cam_with_background(cam: jnp.ndarray) -> jnp.ndarray:
  """[B, h, w, C-1] raw CAM -> [B, h, w, C]: (1 - max_c CAM_norm, CAM_norm), the SEAM background."""
  norm = max_normalize(jax.nn.relu(cam))
  bkg = 1.0 - jnp.max(norm, axis=-1, keepdims=True)
  return jnp.concatenate([bkg, norm], axis=-1)


def label_mask(valid: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """SIPE's valid_mask: [B, h, w] real-pixel mask x [B, C-1] labels -> [B, h, w, C] (bg always on)."""
  with_bg = jnp.concatenate([jnp.ones_like(labels[:, :1]), labels], axis=-1)
  return valid[..., None] * with_bg[:, None, None, :]


def safe_norm(f: jnp.ndarray, axis: int = -1, keepdims: bool = False) -> jnp.ndarray:
  """L2 norm whose gradient at the zero vector is 0 (as PyTorch's), not NaN: absent classes have
  all-zero prototypes."""
  sq = jnp.sum(f * f, axis=axis, keepdims=keepdims)
  return jnp.sqrt(jnp.maximum(sq, 1e-30))


def l2_normalize(f: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  return f / (safe_norm(f, axis=axis, keepdims=True) + NORM_EPS)


def hierarchical_feature(sides: list[jnp.ndarray], size: tuple[int, int], resize) -> jnp.ndarray:
  """F_hie: L2-normalised side outputs resized to `size` and concatenated (norm ~2 per pixel)."""
  return jnp.concatenate([resize(l2_normalize(s), size) for s in sides], axis=-1)


# Rows of the [hw, hw] feature affinity computed at a time in structure_seeds: one block is
# SEED_BLOCK x hw floats (48 MB for a 500x375 image at scale 2.0 and OS8, 11,750 positions, where
# the whole matrix is 0.55 GB per view).
SEED_BLOCK = 1024


def structure_seeds(norm_cam: jnp.ndarray, feature: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Structure-aware seeds (`get_seed`): one-hot argmax of a soft IoU between each pixel's feature
  affinity row and each class map; background IoU halved. No gradient.

  norm_cam: [B, h, w, C] (already masked as the caller wants); feature: [B, h, w, D];
  mask: [B, h, w, C] or broadcastable. Returns one-hot [B, h, w, C] times mask.
  """
  norm_cam = jax.lax.stop_gradient(norm_cam)
  feature = jax.lax.stop_gradient(feature)
  b, h, w, c = norm_cam.shape
  f = l2_normalize(feature.reshape(b, h * w, -1))
  cams = norm_cam.reshape(b, h * w, c)
  inter, rows = _affinity_products(f, cams)
  union = rows + cams.sum(1, keepdims=True) - inter
  iou = inter / union
  iou = iou.at[..., 0].multiply(0.5)
  seeds = jax.nn.one_hot(jnp.argmax(iou, axis=-1), c, dtype=norm_cam.dtype).reshape(b, h, w, c)
  return seeds * mask


def _affinity_products(f: jnp.ndarray, cams: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """With corr = ReLU(f f^T) [B, hw, hw]: (corr @ cams [B, hw, C], corr's row sums [B, hw, 1]),
  SEED_BLOCK rows of corr at a time when hw is larger (never the whole matrix)."""
  n = f.shape[1]
  if n <= SEED_BLOCK:
    corr = jax.nn.relu(jnp.einsum("bid,bjd->bij", f, f))
    return jnp.einsum("bij,bjc->bic", corr, cams), corr.sum(-1, keepdims=True)
  blocks = -(-n // SEED_BLOCK)
  rows = jnp.pad(f, ((0, 0), (0, blocks * SEED_BLOCK - n), (0, 0)))
  rows = rows.reshape(f.shape[0], blocks, SEED_BLOCK, f.shape[2]).transpose(1, 0, 2, 3)

  def block(fi):
    corr = jax.nn.relu(jnp.einsum("bid,bjd->bij", fi, f))
    return jnp.einsum("bij,bjc->bic", corr, cams), corr.sum(-1, keepdims=True)

  inter, sums = jax.lax.map(block, rows)  # [blocks, B, SEED_BLOCK, .]
  unblock = lambda x: x.transpose(1, 0, 2, 3).reshape(f.shape[0], blocks * SEED_BLOCK, -1)[:, :n]
  return unblock(inter), unblock(sums)


def class_prototypes(seeds: jnp.ndarray, feature: jnp.ndarray) -> jnp.ndarray:
  """P_c = mean over all h*w positions of seed_c * F (denominator hw, as SIPE). -> [B, C, D]."""
  b, h, w, c = seeds.shape
  return jnp.einsum("bhwc,bhwd->bcd", seeds, feature) / (h * w)


def cosine_cam(feature: jnp.ndarray, protos: jnp.ndarray) -> jnp.ndarray:
  """ReLU(cos(F(i), P_c)) -> [B, h, w, C]; a zero prototype gives 0 (torch's eps=1e-8 clamp)."""
  dots = jnp.einsum("bhwd,bcd->bhwc", feature, protos)
  fn = safe_norm(feature)[..., None]
  pn = safe_norm(protos)[:, None, None, :]
  return jax.nn.relu(dots / jnp.maximum(fn * pn, 1e-8))


def multilabel_soft_margin(score: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """torch's multilabel_soft_margin_loss: mean over batch and classes of BCE-with-logits."""
  return jnp.mean(labels * jax.nn.softplus(-score) + (1 - labels) * jax.nn.softplus(score))


def gsc_loss(norm_cam: jnp.ndarray, is_cam: jnp.ndarray) -> jnp.ndarray:
  """L_GSC = mean |CAM_norm - IS-CAM / (max + 1e-5)| over every (b, h, w, c)."""
  return jnp.mean(jnp.abs(norm_cam - max_normalize(is_cam)))


def sipe_maps(
    cam: jnp.ndarray, hie: jnp.ndarray, seed_feature: jnp.ndarray, mask: jnp.ndarray, mask_cam: bool = True
) -> dict:
  """The SIPE branch for one forward pass.

  cam: raw [B, h, w, C-1] classifier map; hie: F_hie [B, h, w, D]; seed_feature: x4 in training,
  F_hie at inference; mask: label_mask(...) [B, h, w, C]. Training multiplies the normalised CAM by
  the mask before seeding (mask_cam=True); SIPE's inference does not and only masks the seeds.
  """
  norm_cam = norm_cam_with_background(cam)
  if mask_cam:
    norm_cam = norm_cam * mask
  seeds = structure_seeds(norm_cam, seed_feature, mask)
  protos = class_prototypes(seeds, hie)
  is_cam = cosine_cam(hie, protos)
  return {"norm_cam": norm_cam, "seeds": seeds, "prototypes": protos, "is_cam": is_cam}
