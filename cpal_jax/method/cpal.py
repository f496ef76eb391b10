"""CPAL (Tang et al., CVPR 2024): context prototype-aware learning as a plug-in regulariser.

Pure functions over (projected features, CAMs, labels, CPAL state): any JAX CAM model that gives a
[B, h, w, C-1] class map and a [B, h, w, D] feature map can use them. Equation numbers are the
paper's; every reconstructed choice (docs/method.md section 3, tags [I]) is a config flag here.

Per step (docs/method.md 3.11): instance prototypes (Eq. 4) -> top-K context prototypes of the class
(Eq. 6) -> positiveness weights (Eq. 7) -> feature alignment shift (Eq. 12) -> prototype-aware CAM
(Eq. 13) -> L1 self-supervision against the CAM (Eq. 14); the detached prototypes then go into the
class banks (Eq. 5), which k-means turns into context prototypes at each epoch start.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from cpal_jax.method import bank as bank_lib
from cpal_jax.method import kmeans as kmeans_lib
from cpal_jax.method import sipe

NEG_INF = -1e30
FDA_TARGETS = ("pixels", "region", "anchor", "both")


def default_config() -> ml_collections.ConfigDict:
  """CPAL's flags (docs/method.md section 3); every reconstructed [I] choice is one. The pipeline
  configs hold this under method.cpal."""
  p = ml_collections.ConfigDict()
  p.proj_head = "sipe_hie"  # sipe_hie (F_hie, 768-d for ResNet-50) | conv256 (1x1 conv + ReLU on x4)
  p.proj_dim = 256  # conv256 only
  p.tau = 0.1  # Eq. 4 reliability threshold on the max-normalised CAM
  # Eq. 4's mask M^n: sipe_seed = SIPE's structure-aware seed of class n (the base network's own
  # reliable region, no threshold; without neighbours PACAM is then SIPE's IS-CAM); thresh =
  # [A_n > tau] on the max-normalised CAM (with tau 0.1 mostly background on the synthetic data:
  # the PACAM seed there is 41.1 +- 1.3 against 54 trained with sipe_seed, docs/results.md);
  # thresh_and_argmax = thresh and argmax_c A_c = n.
  p.mask_mode = "sipe_seed"  # sipe_seed | thresh | thresh_and_argmax
  p.capacity = 1000  # Eq. 5 bank length per class
  p.num_clusters = 50  # K_c context prototypes per class
  p.kmeans_iters = 30  # Lloyd iterations at most per clustering (stops earlier when assignments settle)
  p.kmeans_init = "kmeans++"  # kmeans++ | random
  p.kmeans_metric = "euclidean"  # euclidean | cosine
  # Cold start: "epoch" = fill the banks in epoch 1, cluster at the start of every later epoch;
  # "steps" = also re-cluster every recluster_steps while in epoch 1.
  p.cold_start = "epoch"
  p.recluster_steps = 200  # with cold_start=steps: re-cluster every this many steps in epoch 1
  p.min_bank_entries = 1  # a class needs this many bank entries to get context prototypes
  # [I] RCA's push gate (docs/method.md 3.4): instance prototype (b, n) enters class n's bank only if the
  # classifier probability sigmoid(z_{b,n}) > push_min_prob; 0 = off (CPAL names no gate; RCA: 0.7).
  # The background row of bg_mode=bank_bg has no logit and is never gated.
  p.push_min_prob = 0.0
  p.neighbours = True  # Eq. 6 top-K selection (False: the instance prototype alone, Table 2 row 1)
  p.top_k = 20  # 0 = all K_c (plain context prototypes, Table 1 row II)
  p.positiveness = True  # Eq. 7 (False: uniform weights over the neighbours)
  p.positiveness_metric = "dot"  # dot | cos | l1 | l2 (Table 3)
  p.tau_w = 1.0  # temperature of the Eq. 7 positiveness softmax
  p.positiveness_grad = False  # let gradients flow through the Eq. 7 weights
  p.fda = True  # Eqs. 8-12 feature distribution alignment
  # Where Eq. 12's xi_n is added: pixels = every pixel of the image; region = only the pixels of
  # class n's Eq. 4 mask (the instance the shift was computed from); anchor = the instance prototype
  # before top-K and positiveness (Eq. 9 literally); both = pixels and anchor.
  p.fda_target = "pixels"  # pixels | region | anchor | both
  p.gamma = 1.0  # Eq. 12 step size of the feature-alignment shift
  # [I] mu_p of Eq. 12 at inference (make_cam): "image" = each view's own instance prototype, so a
  # map does not depend on which images share the inference batch; "batch" = the mean over the
  # inference batch (both flips of every image in it), as in training.
  p.infer_shift = "image"
  # [I] make_cam first rebuilds the banks, centres and mu_c from one pass of the final weights over
  # the training split (infer/cam.refresh_bank) instead of reading the last epoch's.
  p.refresh_bank = False
  # Background PACAM channel (docs/method.md 3.8): sipe_bg (SIPE's image-specific background prototype)
  # | one_minus_max (1 - max_n PACAM_n) | bank_bg ([I] a background bank as class 0, stored as the
  # bank row after the C-1 foreground rows: the per-image prototype of the valid pixels outside every
  # Eq. 4 foreground mask is pushed, clustered and used by Eqs. 6-13 like a class; see cpal_maps).
  p.bg_mode = "sipe_bg"
  p.include_instance_proto = False  # add the image's own instance prototype to its top-K neighbours
  p.instance_weight = 0.5  # with include_instance_proto
  p.self_loss = True  # Eq. 14 (False: Table 1 rows II-IV train with L_BCE only)
  p.self_weight = 1.0  # beta of Eq. 1
  # [I] SNCLR-style soft-neighbour InfoNCE (docs/method.md 3.1, 3.6 Claim 1), its own loss term "snclr":
  # per valid instance prototype p^n, cross-entropy of softmax_j(cos(p^n, c_j^n) / T) over all of
  # class n's context prototypes against the Eq. 7 weights of its top-K neighbours (detached,
  # summing to 1); mean over the valid (b, n). Trains p^n (the features), never the centres.
  p.snclr_contrast = False
  p.snclr_weight = 1.0  # its weight in the total loss
  p.snclr_temperature = 0.1  # T: cosine logits (tau_w = 1 on cosines in [-1, 1] would be too flat)
  p.keep_sipe_gsc = False  # also train SIPE's L_GSC (Table 1 rows II-IV)
  p.seed_map = "pacam"  # pacam | cam | fused: the map scored as the seed
  p.fused_lambda = 0.7  # fused = CAM + lambda * PACAM (SFC style)
  return p


@flax.struct.dataclass
class CPALState:
  """Row n-1 holds foreground class n (n = 1..C-1); with bg_mode=bank_bg row C-1 holds the
  background (class 0); any rows after that are sharding padding, never written."""

  bank: bank_lib.Bank  # [K_pad, capacity, D] ring buffers, K_pad >= rows (padded for sharding)
  centers: jax.Array  # [K_pad, Kc, D] context prototypes c_k^n
  center_valid: jax.Array  # [K_pad, Kc] bool
  bank_mean: jax.Array  # [K_pad, D] mu_c^n of Eq. 12
  ready: jax.Array  # [K_pad] bool: class n has context prototypes to use


def init_state(
    num_fg: int, capacity: int, dim: int, num_clusters: int, pad_to: int = 1, background: bool = False
) -> CPALState:
  """Empty banks for num_fg classes (plus a background row after them if `background`, for
  bg_mode=bank_bg), the row axis padded to a multiple of pad_to."""
  bank = bank_lib.create(num_fg + int(background), capacity, dim, pad_to)
  k = bank.feats.shape[0]
  return CPALState(
      bank=bank,
      centers=jnp.zeros((k, num_clusters, dim), jnp.float32),
      center_valid=jnp.zeros((k, num_clusters), bool),
      bank_mean=jnp.zeros((k, dim), jnp.float32),
      ready=jnp.zeros((k,), bool),
  )


def recluster(state: CPALState, key: jax.Array, cfg) -> CPALState:
  """Eq. 5 at an epoch start: k-means on every class bank; mu_c is the bank mean."""
  centers, sizes, valid, _ = kmeans_lib.kmeans_bank(
      state.bank.feats,
      state.bank.count,
      state.centers.shape[1],
      key,
      iters=cfg.kmeans_iters,
      init=cfg.kmeans_init,
      metric=cfg.kmeans_metric,
  )
  ready = state.bank.count >= cfg.min_bank_entries
  # A cluster that lost all its points keeps a stale centre: not a context prototype.
  usable = valid & (sizes > 0) & ready[:, None]
  return state.replace(centers=centers, center_valid=usable, bank_mean=bank_lib.mean(state.bank), ready=ready)


MASK_MODES = ("thresh", "thresh_and_argmax", "sipe_seed")


def prototype_mask(norm_cam_fg, tau: float, mask_mode: str = "thresh", seeds_fg=None):
  """Eq. 4's M^n [B, h, w, K] (float 0/1). seeds_fg: SIPE's structure seeds of the foreground
  classes [B, h, w, K] (sipe.structure_seeds(...)[..., 1:]), used by mask_mode=sipe_seed."""
  if mask_mode == "sipe_seed":
    if seeds_fg is None:
      raise ValueError("method.cpal.mask_mode=sipe_seed needs the structure seeds (seeds_fg)")
    return jax.lax.stop_gradient(seeds_fg).astype(norm_cam_fg.dtype)
  m = (norm_cam_fg > tau).astype(norm_cam_fg.dtype)
  if mask_mode == "thresh_and_argmax":
    m = m * jax.nn.one_hot(jnp.argmax(norm_cam_fg, axis=-1), norm_cam_fg.shape[-1], dtype=m.dtype)
  elif mask_mode != "thresh":
    raise ValueError(f"method.cpal.mask_mode={mask_mode!r}: choose one of {', '.join(MASK_MODES)}")
  return m


def instance_prototypes(norm_cam_fg, feats, labels, tau: float, mask_mode: str = "thresh", seeds_fg=None):
  """Eq. 4: p^n = sum_i M^n(i) f(i) / sum_i M^n(i), M^n from prototype_mask, for present classes.

  norm_cam_fg: max-normalised, label- and valid-masked [B, h, w, K]; feats [B, h, w, D].
  Returns (protos [B, K, D], valid [B, K]); an empty mask gives an invalid zero prototype.
  """
  m = prototype_mask(norm_cam_fg, tau, mask_mode, seeds_fg).astype(feats.dtype)
  area = m.sum(axis=(1, 2))  # [B, K]
  protos = jnp.einsum("bhwk,bhwd->bkd", m, feats) / jnp.maximum(area, 1.0)[..., None]
  valid = (labels > 0) & (area > 0)
  return protos, valid


def background_prototype(norm_cam, feats, valid, tau: float):
  """[I] bank_bg's Eq. 4 for class 0: p^0 = mean of f over the reliable background
  M^0(i) = valid(i) [max_n A_n(i) <= tau], the valid pixels outside every (thresh-mode) Eq. 4
  foreground mask; A is the max-normalised, label-masked CAM, so absent classes claim nothing.
  (Equivalently 1 - max_n A_n >= 1 - tau: SEAM's background over the present classes, thresholded
  at 1 - tau rather than tau, which would keep every pixel below 90% of a class's peak.)

  norm_cam [B, h, w, C] (as cpal_maps builds it, channel 0 background); feats [B, h, w, D];
  valid [B, h, w]. Returns (proto [B, 1, D], valid [B, 1]); no background pixel: invalid zero.
  """
  fg_max = jnp.max(norm_cam[..., 1:], axis=-1)
  m = ((fg_max <= tau) & (valid > 0)).astype(feats.dtype)[..., None]  # [B, h, w, 1]
  area = m.sum(axis=(1, 2))  # [B, 1]
  proto = jnp.einsum("bhwk,bhwd->bkd", m, feats) / jnp.maximum(area, 1.0)[..., None]
  return proto, area > 0


def _cosine(a, b, axis=-1):
  return jnp.sum(a * b, axis) / jnp.maximum(sipe.safe_norm(a, axis) * sipe.safe_norm(b, axis), 1e-8)


def select_neighbours(anchor, centers, center_valid, top_k: int):
  """Eq. 6: indices of the top-K context prototypes of each (image, class) by cosine to the anchor.

  anchor [B, K, D]; centers [K, Kc, D]; center_valid [K, Kc]. Returns (idx, valid) [B, K, T].
  """
  anchor = jax.lax.stop_gradient(anchor)
  sim = _cosine(anchor[:, :, None, :], centers[None])  # [B, K, Kc]
  sim = jnp.where(center_valid[None], sim, NEG_INF)
  t = min(top_k, centers.shape[1])
  vals, idx = jax.lax.top_k(sim, t)
  return idx, vals > NEG_INF / 2


def positiveness(anchor, selected, sel_valid, metric: str, tau_w: float, grad: bool = False):
  """Eq. 7: softmax over the K neighbours of g(p) . h(c) / tau_w with identity g, h.

  anchor [B, K, D]; selected [B, K, T, D]. metric dot | cos | l1 | l2 (distances negated).
  """
  a = anchor[:, :, None, :]
  if metric == "dot":
    s = jnp.sum(a * selected, -1)
  elif metric == "cos":
    s = _cosine(a, selected)
  elif metric == "l1":
    s = -jnp.sum(jnp.abs(a - selected), -1)
  elif metric == "l2":
    s = -sipe.safe_norm(a - selected)
  else:
    raise ValueError(f"method.cpal.positiveness_metric={metric!r}: choose dot, cos, l1 or l2")
  s = jnp.where(sel_valid, s / tau_w, NEG_INF)
  w = jax.nn.softmax(s, axis=-1) * sel_valid
  return w if grad else jax.lax.stop_gradient(w)


def uniform_weights(sel_valid):
  v = sel_valid.astype(jnp.float32)
  return v / jnp.maximum(v.sum(-1, keepdims=True), 1.0)


def alignment_shift(protos, proto_valid, bank_mean, ready, per_image: bool = False):
  """Eq. 12: xi_n = mu_c^n - mu_p^n (batch mean of the class-n instance prototypes). [K, D].

  per_image: mu_p^n is each image's own prototype p_b^n instead, giving [B, K, D] (inference, where
  the batch is an arbitrary grouping of images). Zero for classes absent from the batch (image) or
  without a bank; no gradient.
  """
  k = protos.shape[1]
  if per_image:
    ok = proto_valid & ready[None, :k]
    return jax.lax.stop_gradient((bank_mean[None, :k] - protos) * ok[..., None])
  v = proto_valid.astype(protos.dtype)
  n = v.sum(0)  # [K]
  mu_p = jnp.einsum("bk,bkd->kd", v, protos) / jnp.maximum(n, 1.0)[:, None]
  xi = (bank_mean[:k] - mu_p) * ((n > 0) & ready[:k])[:, None]
  return jax.lax.stop_gradient(xi)


def prototype_cam(feats, selected, weights, shift, gamma: float):
  """Eq. 13: PACAM_n(i) = sum_k w_k^n ReLU(cos(f(i) + gamma xi_n, c_k^n)).

  feats [B, h, w, D]; selected [B, K, T, D] (context prototypes, constants); weights [B, K, T]
  (zero for unusable slots); shift [K, D] or [B, K, D] (zeros: no alignment). -> [B, h, w, K].
  The shifted features are never materialised per class: the dot products and norms of
  f + gamma xi expand into f.c, xi.c, f.xi and |xi|^2.
  """
  if shift.ndim == 2:
    shift = jnp.broadcast_to(shift, (feats.shape[0],) + shift.shape)
  fc = jnp.einsum("bhwd,bktd->bhwkt", feats, selected)
  xc = jnp.einsum("bkd,bktd->bkt", shift, selected)
  fx = jnp.einsum("bhwd,bkd->bhwk", feats, shift)
  f2 = jnp.sum(feats * feats, -1)[..., None]
  x2 = jnp.sum(shift * shift, -1)[:, None, None, :]
  norm_f = jnp.sqrt(jnp.maximum(f2 + 2 * gamma * fx + gamma**2 * x2, 1e-30))
  # The expansion cancels in float32 when the shift nearly cancels the feature (|f + g xi| ~ 0,
  # where the cosine is undefined anyway): a floor relative to the operands' scale keeps the
  # rounding noise of the numerator from being divided by ~0.
  norm_f = jnp.maximum(norm_f, 1e-3 * jnp.sqrt(jnp.maximum(f2 + gamma**2 * x2, 1e-30)))
  norm_c = sipe.safe_norm(selected)[:, None, None]  # [B, 1, 1, K, T]
  cos = (fc + gamma * xc[:, None, None]) / jnp.maximum(norm_f[..., None] * norm_c, 1e-8)
  return jnp.sum(weights[:, None, None] * jax.nn.relu(cos), -1)


def gather_centers(centers, center_valid, idx, sel_valid):
  """[K, Kc, D] context prototypes picked by idx [B, K, T] -> [B, K, T, D] (and validity)."""
  k = idx.shape[1]
  centers = jax.lax.stop_gradient(centers)  # context prototypes are constants (Eq. 13)
  picked = jax.vmap(lambda i: jnp.take_along_axis(centers[:k], i[..., None], axis=1))(idx)
  ok = sel_valid & jnp.take_along_axis(
      jnp.broadcast_to(center_valid[:k], (idx.shape[0],) + center_valid[:k].shape), idx, -1
  )
  return picked, ok


def snclr_loss(protos, valid, centers, center_valid, idx, weights, temperature: float):
  """[I] SNCLR-style soft-neighbour InfoNCE (docs/method.md 3.1, 3.6 Claim 1).

  For each (b, n) with valid[b, n] and a neighbour: targets t_j = sum of the weights of the slots
  that picked centre j (Eq. 7's w_k^n over the top-K, renormalised to sum 1), logits
  s_j = cos(p_b^n, c_j^n) / T over every valid centre j of class n (others masked out), and
  loss = -sum_j t_j log softmax(s)_j; the mean over those (b, n), 0 if there are none.
  protos [B, K, D] (with gradient); valid [B, K]; centers [K, Kc, D]; center_valid [K, Kc];
  idx/weights [B, K, T] (weights 0 on unusable slots). Centres and targets are constants.
  """
  k, kc = protos.shape[1], centers.shape[1]
  centers = jax.lax.stop_gradient(centers[:k])
  t = jnp.sum(jax.lax.stop_gradient(weights)[..., None] * jax.nn.one_hot(idx, kc), axis=-2)  # [B, K, Kc]
  total = t.sum(-1)
  ok = valid & (total > 0)
  t = t / jnp.maximum(total, 1e-12)[..., None]
  logits = jnp.where(
      center_valid[None, :k], _cosine(protos[:, :, None, :], centers[None]) / temperature, NEG_INF
  )
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.sum(jnp.where(t > 0, t * logp, 0.0), axis=-1)  # [B, K]
  okf = ok.astype(ce.dtype)
  return jnp.sum(ce * okf) / jnp.maximum(okf.sum(), 1.0)


def bank_entries(cam, feats, labels, valid, cfg, bg_feature=None):
  """Eq. 4 for one forward pass: (label mask [B, h, w, C], masked norm_cam [B, h, w, C], SIPE's
  structure seeds or None, protos, proto_valid), the prototypes lined up with the bank rows
  (bank_bg: the background prototype last). Arguments as cpal_maps."""
  mask = sipe.label_mask(valid, labels)
  norm_cam = sipe.norm_cam_with_background(cam) * mask
  seeds = None  # SIPE's structure seeds: Eq. 4's mask (sipe_seed) and sipe_bg's background
  if cfg.mask_mode == "sipe_seed" or cfg.bg_mode == "sipe_bg":
    seeds = sipe.structure_seeds(norm_cam, feats if bg_feature is None else bg_feature, mask)
  protos, proto_valid = instance_prototypes(
      norm_cam[..., 1:], feats, labels, cfg.tau, cfg.mask_mode, None if seeds is None else seeds[..., 1:]
  )
  if cfg.bg_mode == "bank_bg":
    bg_proto, bg_valid = background_prototype(norm_cam, feats, valid, cfg.tau)
    protos = jnp.concatenate([protos, bg_proto], axis=1)
    proto_valid = jnp.concatenate([proto_valid, bg_valid], axis=1)
  return mask, norm_cam, seeds, protos, proto_valid


def empty_bank(state: CPALState) -> CPALState:
  """The state with every bank emptied (same shapes and shardings), for a refresh pass."""
  bank = state.bank
  return state.replace(
      bank=bank.replace(feats=jnp.zeros_like(bank.feats), ptr=jnp.zeros_like(bank.ptr), count=jnp.zeros_like(bank.count))
  )


def cpal_maps(
    cam, feats, labels, valid, state: CPALState, cfg, bg_feature=None, shift_scope: str = "batch"
) -> dict[str, Any]:
  """The CPAL branch of one forward pass.

  cam: raw [B, h, w, C-1]; feats: projected features f [B, h, w, D]; labels [B, C-1]; valid
  [B, h, w]; bg_feature: what SIPE's structure seeds use for the background prototype (x4 in
  training, F_hie at inference) when cfg.bg_mode == "sipe_bg".
  Returns norm_cam [B, h, w, C] (masked, with background), pacam [B, h, w, C] (normalised, with
  background), protos/proto_valid (Eq. 4) for the bank, the channel mask L_self may use, and with
  cfg.snclr_contrast the "snclr" loss. protos/proto_valid line up with the bank rows: [B, C-1, ...],
  or [B, C, ...] with bg_mode=bank_bg (the background prototype last, as its bank row).

  bank_bg runs the background through Eqs. 6-13 as one more class: its instance prototype
  (background_prototype), top-K of its context prototypes, positiveness, its own shift xi_0 and
  the Eq. 13 map, max-normalised; the state needs the background row (init_state(background=True)).

  shift_scope: "batch" (training) or "image" (per-image mu_p in Eq. 12; cfg.infer_shift at inference).
  """
  if shift_scope not in ("batch", "image"):
    raise ValueError(f"method.cpal.infer_shift={shift_scope!r}: choose image or batch")
  if cfg.bg_mode not in ("sipe_bg", "one_minus_max", "bank_bg"):
    raise ValueError(f"method.cpal.bg_mode={cfg.bg_mode!r}: choose sipe_bg, one_minus_max or bank_bg")
  mask, norm_cam, seeds, protos, proto_valid = bank_entries(cam, feats, labels, valid, cfg, bg_feature)
  seeds_fg = seeds[..., 1:] if seeds is not None else None
  bank_bg = cfg.bg_mode == "bank_bg"
  row_mask = mask[..., 1:]  # the map channels of the rows Eqs. 6-13 run on
  if bank_bg:
    rows = labels.shape[1] + 1
    if state.ready.shape[0] < rows:
      raise ValueError(
          f"method.cpal.bg_mode=bank_bg needs {rows} bank rows (the background after the "
          f"{rows - 1} classes), the state has {state.ready.shape[0]}: init_state(..., background=True)"
      )
    row_mask = jnp.concatenate([row_mask, mask[..., :1]], axis=-1)
  k = protos.shape[1]
  ready = state.ready[:k]

  xi = (
      alignment_shift(protos, proto_valid, state.bank_mean, state.ready, shift_scope == "image")
      if cfg.fda
      else jnp.zeros((k, feats.shape[-1]))
  )
  # The instance prototype keeps its gradient where it enters PACAM (as an own neighbour, or
  # through positiveness_grad); neighbour selection itself is discrete and detached.
  anchor = protos
  if cfg.fda and cfg.fda_target in ("anchor", "both"):
    anchor = anchor + cfg.gamma * (xi if xi.ndim == 3 else xi[None])
  pixel_shift = xi if (cfg.fda and cfg.fda_target in ("pixels", "both", "region")) else jnp.zeros_like(xi)
  if cfg.fda and cfg.fda_target not in FDA_TARGETS:
    raise ValueError(f"method.cpal.fda_target={cfg.fda_target!r}: choose one of {', '.join(FDA_TARGETS)}")
  # region: the shifted read inside class n's Eq. 4 mask, the unshifted one elsewhere.
  region = None
  if cfg.fda and cfg.fda_target == "region":
    region = prototype_mask(norm_cam[..., 1:], cfg.tau, cfg.mask_mode, seeds_fg)
    if bank_bg:
      region = jnp.concatenate([region, (jnp.max(norm_cam[..., 1:], -1, keepdims=True) <= cfg.tau)], -1)

  out = {}
  own = anchor[:, :, None]  # the instance prototype as one more "neighbour"
  if not cfg.neighbours:
    # Table 2's first row: no context, only the image's own prototype (a SIPE-style IS-CAM).
    selected, w = own, jnp.ones(own.shape[:3])
    if cfg.snclr_contrast:
      out["snclr"] = jnp.zeros((), jnp.float32)  # no context prototypes to contrast with
  else:
    top_k = cfg.top_k if cfg.top_k > 0 else state.centers.shape[1]
    idx, sel_ok = select_neighbours(anchor, state.centers[:k], state.center_valid[:k], top_k)
    selected, sel_ok = gather_centers(state.centers, state.center_valid, idx, sel_ok)
    if cfg.positiveness:
      w = positiveness(anchor, selected, sel_ok, cfg.positiveness_metric, cfg.tau_w, cfg.positiveness_grad)
    else:
      w = uniform_weights(sel_ok)
    if cfg.snclr_contrast:
      out["snclr"] = snclr_loss(
          protos, proto_valid & ready[None], state.centers, state.center_valid, idx, w, cfg.snclr_temperature
      )
    if cfg.include_instance_proto:
      w0 = cfg.instance_weight
      selected = jnp.concatenate([selected, own], axis=2)
      w = jnp.concatenate([w * (1 - w0), jnp.full(own.shape[:3], w0)], axis=-1)
  w = w * proto_valid[..., None]
  usable = (ready[None] | (not cfg.neighbours)) & proto_valid
  fg = prototype_cam(feats, selected, w, pixel_shift, cfg.gamma)
  if region is not None:
    fg = jnp.where(region > 0, fg, prototype_cam(feats, selected, w, jnp.zeros_like(pixel_shift), cfg.gamma))
  fg = fg * usable[:, None, None, :]
  fg = sipe.max_normalize(fg * row_mask)

  if bank_bg:
    fg, bg = fg[..., :-1], fg[..., -1:]
    usable, bg_usable = usable[:, :-1], usable[:, -1:]
  elif cfg.bg_mode == "sipe_bg":
    bg_proto = sipe.class_prototypes(seeds[..., :1], feats)  # [B, 1, D]
    bg = sipe.max_normalize(sipe.cosine_cam(feats, bg_proto)) * mask[..., :1]
  else:
    bg = (1.0 - jnp.max(fg, axis=-1, keepdims=True)) * mask[..., :1]
  pacam = jnp.concatenate([bg, fg], axis=-1)
  # Channels L_self may compare: present classes that have context prototypes, and the background
  # of images that have at least one (none during the cold start: L_BCE alone, docs/method.md 3.4);
  # bank_bg's background channel, like a class, where its own context prototypes were used.
  if not bank_bg:
    bg_usable = jnp.any(usable, axis=-1, keepdims=True)
  loss_mask = jnp.concatenate([bg_usable, usable], axis=-1)
  return {
      "norm_cam": norm_cam,
      "pacam": pacam,
      "protos": protos,
      "proto_valid": proto_valid,
      "loss_mask": loss_mask,
      **out,
  }


def self_loss(norm_cam, pacam, loss_mask):
  """Eq. 14: mean L1 between the normalised CAM and PACAM over (b, h, w, c), background included.

  Same reduction as SIPE's L_GSC (absent classes count, at zero); channels without context
  prototypes yet (cold start) contribute nothing rather than pulling the CAM to zero.
  """
  return jnp.mean(jnp.abs(norm_cam - pacam) * loss_mask[:, None, None, :].astype(norm_cam.dtype))


def push_gate(proto_valid, score, min_prob: float):
  """[I] RCA's push gate: proto_valid & (sigmoid(score) > min_prob); min_prob <= 0 is off (the
  validity unchanged, whatever the logits). score [B, C-1] lines up with the first C-1 rows of
  proto_valid [B, R]; a trailing background row (bank_bg) has no logit and is not gated."""
  if min_prob <= 0.0 or score is None:
    return proto_valid
  k = score.shape[1]
  if proto_valid.shape[1] not in (k, k + 1):
    raise ValueError(f"push gate: {score.shape[1]} class logits for {proto_valid.shape[1]} bank rows")
  gate = jax.nn.sigmoid(jax.lax.stop_gradient(score).astype(jnp.float32)) > min_prob
  if proto_valid.shape[1] > k:
    gate = jnp.concatenate([gate, jnp.ones_like(gate[:, :1])], axis=1)
  return proto_valid & gate


def push_prototypes(state: CPALState, protos, proto_valid, score=None, min_prob: float = 0.0) -> CPALState:
  """Eq. 5: the detached instance prototypes of the whole (global) batch enter the FIFO banks.

  With score (the class logits z [B, C-1]) and min_prob > 0, only those with sigmoid(z) > min_prob
  (push_gate; cfg.push_min_prob)."""
  proto_valid = push_gate(proto_valid, score, min_prob)
  return state.replace(bank=bank_lib.push(state.bank, jax.lax.stop_gradient(protos), proto_valid))
