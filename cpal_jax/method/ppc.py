"""PPC (Du et al., CVPR 2022): pixel-to-prototype contrast as a plug-in regulariser (docs/method.md 4).

Follows usr922/wseg's SEAM variant (`contrast_train.py`): a second, smaller view of the same crop;
per view, pseudo labels from the CAM with a constant background score and batch-wide class
prototypes from the top-scoring pixels; then three InfoNCE terms over L2-normalised projected
pixel features (cross-prototype, cross-pseudo-label, intra-view with semi-hard prototype mining and
hard pixel sampling), plus the two-view BCE and the equivariance L1 of the two views' CAMs.

Pure functions over (CAMs, projected features, labels, a PRNG key): any JAX CAM model that gives a
[B, h, w, C-1] foreground map and a [B, h, w, D] feature map can use them. Channel 0 of every
C-channel map is background. Shapes stay static: the reference's per-class Python loops with
variable-size index sets become masks, within-class ranks from one sort, and segment sums.

Choices forced by the base network, tagged [I] (each a flag in `default_config`):
- The reference runs on SEAM, whose PCM turns the detached, max-normalised CAM into `cam_rv` by
  feature affinity. This base (SIPE's CAMNet) has no PCM, so the network's own CAM stands in for
  `cam_rv` wherever PPC reads it: pseudo labels and prototype scores (`pseudo_norm`, `pseudo_bg`).
- SEAM's adaptive min-pooling and ECR terms are not implemented: both act on `cam_rv`, which PCM
  builds from the *detached* CAM, so their gradients only ever train PCM. With no PCM there is
  nothing for them to train; moving them onto the CAM itself would be a different method.
- The background prototype: its score is the constant bg_threshold everywhere, so top-k picks the
  first k pixels of the batch in row-major order (`proto_bg = "scores"`, as the reference's
  arbitrary tie-breaking); `proto_bg = "one_minus_max"` ranks background pixels by 1 - max fg.
- Padding: the reference contrasts padded crop borders too (`ignore_padding = False`).
- Prototypes of classes with no usable pixel (all scores masked, or zero weight sum; the reference
  would divide by zero) are flagged invalid and left out of every softmax.
"""

import jax
import jax.numpy as jnp
import ml_collections

from cpal_jax import image_ops
from cpal_jax.method import sipe

NORM_EPS = 1e-5  # the reference's epsilon in every min-max normalisation
NEG = -1e30  # logit of an invalid prototype: exp() is exactly 0, no NaN in logsumexp


def default_config() -> ml_collections.ConfigDict:
  """PPC's hyper-parameters (docs/method.md 4.2-4.6); the pipeline configs hold this under method.ppc."""
  p = ml_collections.ConfigDict()
  p.proj_dim = 128  # fc_proj: 1x1 conv on x4 -> 128, then ReLU
  p.temperature = 0.1  # InfoNCE temperature of the pixel-to-prototype contrast
  p.bg_threshold = 0.20  # constant background score of the pseudo labels
  p.top_fraction = 1 / 8  # prototype pixels per class over the batch: (h*w) * this, h, w of view 2
  p.semi_hard_skip = 3  # intra-view negatives: prototype ranks 4..13 by similarity (skip the top 3)
  p.semi_hard_count = 10  # (clipped to the number of classes)
  p.sample_fraction = 0.5  # hard pixel sampling: n//2 random pixels of a class ...
  p.hard_pool_fraction = 0.6  # ... + n//2 of its lowest floor(0.6 n) by similarity (hardest dropped)
  p.cross_proto_weight = 0.1  # weight of PPC's cross-view prototype contrast term
  p.cross_label_weight = 0.1  # weight of PPC's cross-view label contrast term
  p.intra_weight = 0.1  # weight of PPC's intra-view contrast term
  p.view2_ratio = 3.5  # view 2 = view 1 resized by 1/ratio (448 -> 128), rounded to the stride
  p.view2_size = 0  # >0: view 2's side in pixels (overrides view2_ratio)
  p.er_weight = 1.0  # equivariance L1 between the two views' foreground CAMs
  p.er_size = "image"  # image: compared at view 2's input size, as SEAM | map: at its CAM size
  # [I] cam_rv stand-ins (see the module docstring).
  p.pseudo_norm = "minmax"  # minmax (the reference's, on cam_rv) | max (SIPE's max-normalisation)
  p.pseudo_bg = "constant"  # constant bg_threshold (the reference) | one_minus_max (SIPE/SEAM style)
  p.proto_bg = "scores"  # scores: the pseudo-label scores (reference) | one_minus_max
  p.proto_label_mask = False  # rank prototype pixels only in images labelled with the class
  p.ignore_padding = False  # leave padded crop pixels out of the score normalisation, the
  # prototypes and the contrast terms (the BCE and equivariance terms see whole maps either way)
  p.keep_sipe_gsc = False  # also train SIPE's L_GSC (the base's own regulariser)
  return p


def view2_size(hw: tuple[int, int], stride: int, cfg) -> tuple[int, int]:
  """View 2's input size: cfg.view2_size, or each side / view2_ratio rounded to a stride multiple."""
  if cfg.view2_size > 0:
    return (cfg.view2_size, cfg.view2_size)
  return tuple(max(stride, round(d / cfg.view2_ratio / stride) * stride) for d in hw)


def second_view(images: jnp.ndarray, valid: jnp.ndarray, size: tuple[int, int]):
  """The reference's img2: the normalised crop resized (bilinear, align_corners=True) to `size`.

  images [B, H, W, 3]; valid [B, H, W] real pixels. Returns (images2, valid2 [B, h2, w2] float).
  """
  images2 = image_ops.resize_bilinear_align_corners(images, size)
  valid2 = image_ops.resize_nearest(valid.astype(jnp.float32)[..., None], size)[..., 0]
  return images2, valid2


def _spatial_min_max(x: jnp.ndarray, valid: jnp.ndarray | None):
  """Per image and channel min and max over the pixels where valid [B, h, w] (all if None)."""
  if valid is None:
    return jnp.min(x, axis=(1, 2), keepdims=True), jnp.max(x, axis=(1, 2), keepdims=True)
  v = (valid > 0)[..., None]
  mn = jnp.min(jnp.where(v, x, jnp.inf), axis=(1, 2), keepdims=True)
  mx = jnp.max(jnp.where(v, x, -jnp.inf), axis=(1, 2), keepdims=True)
  some = jnp.any(v, axis=(1, 2), keepdims=True)
  return jnp.where(some, mn, 0.0), jnp.where(some, mx, 0.0)


def minmax_normalize(cam: jnp.ndarray, valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """The reference's pseudo-label normalisation of ReLU(cam) per image and channel: values below
  min + 1e-5 are zeroed *before* (x - min - 1e-5) / (max - min + 1e-5), so they come out slightly
  negative; kept as is, it decides which pixels are prototype candidates of an all-zero class.
  valid: min and max over these pixels only (ignore_padding)."""
  x = jax.nn.relu(cam)
  mn, mx = _spatial_min_max(x, valid)
  x = jnp.where(x < mn + NORM_EPS, 0.0, x)
  return (x - mn - NORM_EPS) / (mx - mn + NORM_EPS)


def seam_max_norm(cam: jnp.ndarray) -> jnp.ndarray:
  """SEAM's `max_norm` (used by the equivariance loss): ReLU(ReLU(x) - min - e) / (max - min + e)."""
  x = jax.nn.relu(cam)
  mn, mx = _spatial_min_max(x, None)
  return jax.nn.relu(x - mn - NORM_EPS) / (mx - mn + NORM_EPS)


def class_scores(cam_fg: jnp.ndarray, cfg, valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """[B, h, w, C-1] CAM (cam_rv's stand-in) -> [B, h, w, C] scores: background first (docs/method.md
  4.4 steps 1-2). Not label-masked: the reference ranks prototype pixels on these. valid: the
  normalisation's statistics come from these pixels only (ignore_padding)."""
  if cfg.pseudo_norm == "minmax":
    fg = minmax_normalize(cam_fg, valid)
  elif cfg.pseudo_norm == "max":
    x = jax.nn.relu(cam_fg)
    fg = x / (_spatial_min_max(x, valid)[1] + sipe.NORM_EPS)
  else:
    raise ValueError(f"method.ppc.pseudo_norm={cfg.pseudo_norm!r}: choose minmax or max")
  if cfg.pseudo_bg == "constant":
    bg = jnp.full(fg.shape[:3] + (1,), cfg.bg_threshold, fg.dtype)
  elif cfg.pseudo_bg == "one_minus_max":
    bg = 1.0 - jnp.max(fg, axis=-1, keepdims=True)
  else:
    raise ValueError(f"method.ppc.pseudo_bg={cfg.pseudo_bg!r}: choose constant or one_minus_max")
  return jnp.concatenate([bg, fg], axis=-1)


def _with_bg(labels: jnp.ndarray) -> jnp.ndarray:
  return jnp.concatenate([jnp.ones_like(labels[:, :1]), labels], axis=-1)


def pseudo_labels(scores: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Step 3: argmax over background and the image's labelled classes -> [B, h, w] int32.

  The reference's argmax(softmax(scores * labels)); the softmax does not move the argmax, and
  absent classes are excluded outright rather than scored 0 (they can only win there when every
  allowed score is negative, which the reference would label with an absent class).
  """
  allowed = _with_bg(labels)[:, None, None, :] > 0
  return jnp.argmax(jnp.where(allowed, scores, -jnp.inf), axis=-1).astype(jnp.int32)


def ranking_scores(scores: jnp.ndarray, labels: jnp.ndarray, cfg) -> jnp.ndarray:
  """What prototype pixels are ranked by: the pseudo-label scores, with the [I] options applied."""
  if cfg.proto_bg == "one_minus_max":
    scores = scores.at[..., 0].set(1.0 - jnp.max(scores[..., 1:], axis=-1))
  elif cfg.proto_bg != "scores":
    raise ValueError(f"method.ppc.proto_bg={cfg.proto_bg!r}: choose scores or one_minus_max")
  if cfg.proto_label_mask:
    scores = jnp.where(_with_bg(labels)[:, None, None, :] > 0, scores, -jnp.inf)
  return scores


def top_k_count(h: int, w: int, fraction: float) -> int:
  """Prototype pixels per class: (h*w) * fraction of one image's map, at least 1 (tiny maps)."""
  return max(1, int(h * w * fraction))


def prototypes(scores: jnp.ndarray, feats: jnp.ndarray, k: int, eligible: jnp.ndarray | None = None):
  """Batch-wide class prototypes (docs/method.md 4.4 step 4), no gradient.

  scores [B, h, w, C] ranking scores (-inf: not a candidate); feats [B, h, w, D] raw projected
  features; eligible [B, h, w] bool or None. For every class, the top-k pixels of the whole batch
  by score (ties: lower flat index first), their features averaged with the scores as weights,
  then L2-normalised. Returns (protos [C, D], valid [C]).
  """
  scores = jax.lax.stop_gradient(scores)
  feats = jax.lax.stop_gradient(feats)
  c, d = scores.shape[-1], feats.shape[-1]
  s = scores.reshape(-1, c)
  if eligible is not None:
    s = jnp.where(eligible.reshape(-1, 1), s, -jnp.inf)
  vals, idx = jax.lax.top_k(s.T, k)  # [C, k]
  picked = vals > -jnp.inf
  wts = jnp.where(picked, vals, 0.0)
  f = feats.reshape(-1, d)[idx]  # [C, k, D]
  den = wts.sum(-1)
  valid = jnp.any(picked, -1) & (den != 0)
  protos = jnp.einsum("ck,ckd->cd", wts, f) / jnp.where(valid, den, 1.0)[:, None]
  return normalize(jnp.where(valid[:, None], protos, 0.0)), valid


def normalize(f: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  """torch's F.normalize: f / max(|f|, 1e-12); a zero vector stays zero with a zero gradient."""
  return f / jnp.maximum(sipe.safe_norm(f, axis=axis, keepdims=True), 1e-12)


def _logits(feats_n, protos, proto_valid, temperature):
  return jnp.where(proto_valid[None], feats_n @ protos.T / temperature, NEG)


def info_nce(feats_n, protos, proto_valid, pos, temperature: float):
  """Per-pixel -log(exp(f.p_pos/t) / sum_c exp(f.p_c/t)): negatives are all (valid) prototypes.

  feats_n [P, D] L2-normalised pixel features; protos [C, D]; pos [P] class index. -> [P].
  """
  logits = _logits(feats_n, protos, proto_valid, temperature)
  pos_logit = jnp.take_along_axis(logits, pos[:, None], -1)[:, 0]
  return jax.nn.logsumexp(logits, -1) - pos_logit


def semi_hard_nce(feats_n, protos, proto_valid, pos, temperature: float, skip: int, count: int):
  """Intra-view InfoNCE with semi-hard prototype mining: the denominator is exp(positive) plus the
  prototypes ranked skip+1..skip+count by similarity to the pixel (all classes, the positive
  included, so it may count twice). Ranks past the number of classes are dropped. -> [P]."""
  logits = _logits(feats_n, protos, proto_valid, temperature)
  pos_logit = jnp.take_along_axis(logits, pos[:, None], -1)[:, 0]
  top = min(skip + count, logits.shape[-1])
  negs = jax.lax.top_k(logits, top)[0][:, skip:]  # the ranking itself carries no gradient in
  # the reference either: only the gathered similarities do, as top_k's values here
  both = jnp.concatenate([pos_logit[:, None], negs], axis=-1)
  return jax.nn.logsumexp(both, -1) - pos_logit


def _rank_within_class(group, key_vals, num_groups: int):
  """Rank of each element among its group's elements ordered by key_vals ascending (ties: lower
  index first). One sort of (group, key, index) instead of a loop over classes."""
  p = group.shape[0]
  iota = jnp.arange(p, dtype=jnp.int32)
  _, _, order = jax.lax.sort((group, key_vals, iota), num_keys=3)
  pos = jnp.zeros(p, jnp.int32).at[order].set(iota)
  counts = jnp.zeros(num_groups, jnp.int32).at[group].add(1)
  start = jnp.cumsum(counts) - counts
  return pos - start[group]


def hard_pixel_selection(
    pos, sim, eligible, u, num_classes: int, sample_fraction: float, pool_fraction: float
):
  """Hard pixel sampling (docs/method.md 4.5.3), per class c with n_c pixels:
  - random: the n_c//2 pixels of c with the smallest u (uniform draws: a random subset);
  - semi-hard: ascending by sim, ranks [floor(0.6 n_c) - n_c//2, floor(0.6 n_c)), i.e. the lowest
    60% without its hardest ~10%.

  pos [P] class of each pixel; sim [P] (cos + 1) / 2 to its own prototype; eligible [P] bool;
  u [P] in [0, 1). Returns (random [P] bool, semi_hard [P] bool, n [C] pixels per class).
  """
  group = jnp.where(eligible, pos, num_classes)
  n = jnp.zeros(num_classes + 1, jnp.int32).at[group].add(1)[:num_classes]
  n_pix = jnp.where(eligible, n[jnp.minimum(group, num_classes - 1)], 0).astype(jnp.float32)
  n_sample = jnp.floor(n_pix * sample_fraction)
  n_pool = jnp.floor(n_pix * pool_fraction)
  rank_u = _rank_within_class(group, u, num_classes + 1)
  rank_s = _rank_within_class(group, sim, num_classes + 1)
  rand = eligible & (rank_u < n_sample)
  hard = eligible & (rank_s >= n_pool - n_sample) & (rank_s < n_pool)
  return rand, hard, n


def intra_view_loss(per_pixel, pos, rand, hard, n, sample_fraction: float):
  """Mean of per_pixel over each class's sampled pixels (a pixel in both samples counts twice, as
  the reference's concatenation), averaged over the classes present; classes with < 2 pixels add
  0 but still count."""
  num_classes = n.shape[0]
  cnt = rand.astype(per_pixel.dtype) + hard.astype(per_pixel.dtype)
  sums = jnp.zeros(num_classes, per_pixel.dtype).at[pos].add(cnt * per_pixel)
  n_sample = jnp.floor(n.astype(jnp.float32) * sample_fraction)
  per_class = jnp.where(n >= 2, sums / jnp.maximum(2 * n_sample, 1.0), 0.0)
  return per_class.sum() / jnp.maximum(jnp.sum(n >= 1), 1)


def _weighted_mean(x, w):
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def equivariance_loss(cam1, cam2, labels, size: tuple[int, int]):
  """SEAM's L_ER: mean |max_norm(CAM_1) - max_norm(CAM_2)| over the foreground channels of both
  views at `size` (view 2's input size in SEAM), label-masked.

  SEAM upsamples each CAM to its input size inside the network before max_norm and then resizes
  view 1 to view 2's size; here view 1 is max-normalised at its map size and resized once (the
  align-corners upsampling keeps each channel's min and max, so only ReLU at zero crossings can
  differ). Gradients reach both views.
  """
  n1 = image_ops.resize_bilinear_align_corners(seam_max_norm(cam1), size)
  n2 = seam_max_norm(image_ops.resize_bilinear_align_corners(cam2, size))
  m = labels[:, None, None, :]
  return jnp.mean(jnp.abs(n1 * m - n2 * m))


def contrast_losses(cam1, feats1, cam2, feats2, labels, key, cfg, valid=None) -> dict:
  """The three contrast terms of docs/method.md 4.5 and their weighted sum (4.6).

  cam1 [B, H1, W1, C-1], feats1 [B, H1, W1, D]: view 1's raw CAM and projected features (ReLU
  outputs); cam2, feats2: view 2's at [B, h, w, ...]; view 1's are resized to (h, w) (bilinear,
  align_corners=True). labels [B, C-1]; key: PRNG key of the random pixel samples; valid [B, h, w]
  or None: real pixels on view 2's grid (used with cfg.ignore_padding).
  Gradients flow only through the pixel features: pseudo labels and prototypes are detached.
  """
  if cfg.hard_pool_fraction < cfg.sample_fraction:
    raise ValueError(
        f"method.ppc.hard_pool_fraction={cfg.hard_pool_fraction} must be >= "
        f"sample_fraction={cfg.sample_fraction}: the semi-hard pixels are taken from that pool"
    )
  b, h, w, _ = cam2.shape
  num_classes = cam2.shape[-1] + 1
  cam1 = image_ops.resize_bilinear_align_corners(cam1, (h, w))
  feats1 = image_ops.resize_bilinear_align_corners(feats1, (h, w))
  eligible = None
  if cfg.ignore_padding and valid is not None:
    eligible = valid > 0
  px = jnp.ones((b * h * w,), bool) if eligible is None else eligible.reshape(-1)
  k = top_k_count(h, w, cfg.top_fraction)

  views = []
  for cam, f in ((cam1, feats1), (cam2, feats2)):
    scores = class_scores(jax.lax.stop_gradient(cam), cfg, eligible)
    pl = pseudo_labels(scores, labels).reshape(-1)
    protos, ok = prototypes(ranking_scores(scores, labels, cfg), f, k, eligible)
    views.append((pl, protos, ok, normalize(f).reshape(b * h * w, -1)))
  (pl1, p1, ok1, f1), (pl2, p2, ok2, f2) = views
  t = cfg.temperature

  def nce(f, protos, ok, pos):
    return _weighted_mean(info_nce(f, protos, ok, pos, t), (px & ok[pos]).astype(f.dtype))

  # Cross-prototype: a view's pixels and labels against the other view's prototypes.
  cross_proto = 0.5 * (nce(f1, p2, ok2, pl1) + nce(f2, p1, ok1, pl2))
  # Cross-pseudo-label: a view's pixels and prototypes with the other view's labels.
  cross_label = 0.5 * (nce(f1, p1, ok1, pl2) + nce(f2, p2, ok2, pl1))

  def intra(f, protos, ok, pos, key):
    per_pixel = semi_hard_nce(f, protos, ok, pos, t, cfg.semi_hard_skip, cfg.semi_hard_count)
    sim = jax.lax.stop_gradient((jnp.sum(f * protos[pos], -1) + 1) / 2)
    u = jax.random.uniform(key, pos.shape)
    rand, hard, n = hard_pixel_selection(
        pos, sim, px & ok[pos], u, num_classes, cfg.sample_fraction, cfg.hard_pool_fraction
    )
    return intra_view_loss(per_pixel, pos, rand, hard, n, cfg.sample_fraction)

  k1, k2 = jax.random.split(key)
  intra_term = 0.5 * (intra(f1, p1, ok1, pl1, k1) + intra(f2, p2, ok2, pl2, k2))
  total = cfg.cross_proto_weight * cross_proto + cfg.cross_label_weight * cross_label
  total = total + cfg.intra_weight * intra_term
  return {
      "ppc_cross_proto": cross_proto,
      "ppc_cross_label": cross_label,
      "ppc_intra": intra_term,
      "ppc_nce": total,
  }
