"""CPAL (Tang et al., CVPR 2024): context prototype-aware learning as a plug-in regulariser.

Pure functions over (projected features, CAMs, labels, CPAL state): any JAX CAM model that gives a
[B, h, w, C-1] class map and a [B, h, w, D] feature map can use them. Equation numbers are the
paper's; every reconstructed choice (METHOD.md section 3, tags [I]) is a config flag here.

Per step (METHOD.md 3.11): instance prototypes (Eq. 4) -> top-K context prototypes of the class
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


def default_config() -> ml_collections.ConfigDict:
  """CPAL's flags (METHOD.md section 3); every reconstructed [I] choice is one. The pipeline
  configs hold this under method.cpal."""
  p = ml_collections.ConfigDict()
  p.proj_head = "sipe_hie"  # sipe_hie (F_hie, 768-d for ResNet-50) | conv256 (1x1 conv + ReLU on x4)
  p.proj_dim = 256  # conv256 only
  p.tau = 0.1  # Eq. 4 reliability threshold on the max-normalised CAM
  p.mask_mode = "thresh"  # thresh | thresh_and_argmax
  p.capacity = 1000  # Eq. 5 bank length per class
  p.num_clusters = 50  # K_c context prototypes per class
  p.kmeans_iters = 30
  p.kmeans_init = "kmeans++"  # kmeans++ | random
  p.kmeans_metric = "euclidean"  # euclidean | cosine
  # Cold start: "epoch" = fill the banks in epoch 1, cluster at the start of every later epoch;
  # "steps" = also re-cluster every recluster_steps while in epoch 1.
  p.cold_start = "epoch"
  p.recluster_steps = 200
  p.min_bank_entries = 1  # a class needs this many bank entries to get context prototypes
  p.neighbours = True  # Eq. 6 top-K selection (False: the instance prototype alone, Table 2 row 1)
  p.top_k = 20  # 0 = all K_c (plain context prototypes, Table 1 row II)
  p.positiveness = True  # Eq. 7 (False: uniform weights over the neighbours)
  p.positiveness_metric = "dot"  # dot | cos | l1 | l2 (Table 3)
  p.tau_w = 1.0
  p.positiveness_grad = False
  p.fda = True  # Eqs. 8-12 feature distribution alignment
  p.fda_target = "pixels"  # pixels | anchor | both
  p.gamma = 1.0
  p.bg_mode = "sipe_bg"  # sipe_bg | one_minus_max
  p.include_instance_proto = False
  p.instance_weight = 0.5  # with include_instance_proto
  p.self_loss = True  # Eq. 14 (False: Table 1 rows II-IV train with L_BCE only)
  p.self_weight = 1.0  # beta of Eq. 1
  p.keep_sipe_gsc = False
  p.seed_map = "pacam"  # pacam | cam | fused: the map scored as the seed
  p.fused_lambda = 0.7  # fused = CAM + lambda * PACAM (SFC style)
  return p


@flax.struct.dataclass
class CPALState:
  bank: bank_lib.Bank  # [K_pad, capacity, D] ring buffers, K_pad >= C-1 (padded for sharding)
  centers: jax.Array  # [K_pad, Kc, D] context prototypes c_k^n
  center_valid: jax.Array  # [K_pad, Kc] bool
  bank_mean: jax.Array  # [K_pad, D] mu_c^n of Eq. 12
  ready: jax.Array  # [K_pad] bool: class n has context prototypes to use


def init_state(num_fg: int, capacity: int, dim: int, num_clusters: int, pad_to: int = 1) -> CPALState:
  bank = bank_lib.create(num_fg, capacity, dim, pad_to)
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
  centers, sizes, valid = kmeans_lib.kmeans_bank(
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


def instance_prototypes(norm_cam_fg, feats, labels, tau: float, mask_mode: str = "thresh"):
  """Eq. 4: p^n = sum_i M^n(i) f(i) / sum_i M^n(i), M^n = [A_n > tau] for present classes.

  norm_cam_fg: max-normalised, label- and valid-masked [B, h, w, K]; feats [B, h, w, D].
  Returns (protos [B, K, D], valid [B, K]); an empty mask gives an invalid zero prototype.
  """
  m = (norm_cam_fg > tau).astype(feats.dtype)
  if mask_mode == "thresh_and_argmax":
    top = jax.nn.one_hot(jnp.argmax(norm_cam_fg, axis=-1), norm_cam_fg.shape[-1], dtype=feats.dtype)
    m = m * top
  elif mask_mode != "thresh":
    raise ValueError(f"method.cpal.mask_mode={mask_mode!r}: choose thresh or thresh_and_argmax")
  area = m.sum(axis=(1, 2))  # [B, K]
  protos = jnp.einsum("bhwk,bhwd->bkd", m, feats) / jnp.maximum(area, 1.0)[..., None]
  valid = (labels > 0) & (area > 0)
  return protos, valid


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


def alignment_shift(protos, proto_valid, bank_mean, ready):
  """Eq. 12: xi_n = mu_c^n - mu_p^n (batch mean of the class-n instance prototypes). [K, D].

  Zero for classes absent from the batch or without a bank; no gradient.
  """
  v = proto_valid.astype(protos.dtype)
  n = v.sum(0)  # [K]
  mu_p = jnp.einsum("bk,bkd->kd", v, protos) / jnp.maximum(n, 1.0)[:, None]
  xi = (bank_mean[: protos.shape[1]] - mu_p) * ((n > 0) & ready[: protos.shape[1]])[:, None]
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


def cpal_maps(cam, feats, labels, valid, state: CPALState, cfg, bg_feature=None) -> dict[str, Any]:
  """The CPAL branch of one forward pass.

  cam: raw [B, h, w, C-1]; feats: projected features f [B, h, w, D]; labels [B, C-1]; valid
  [B, h, w]; bg_feature: what SIPE's structure seeds use for the background prototype (x4 in
  training, F_hie at inference) when cfg.bg_mode == "sipe_bg".
  Returns norm_cam [B, h, w, C] (masked, with background), pacam [B, h, w, C] (normalised, with
  background), protos/proto_valid (Eq. 4) for the bank, and the channel mask L_self may use.
  """
  mask = sipe.label_mask(valid, labels)
  norm_cam = sipe.norm_cam_with_background(cam) * mask
  protos, proto_valid = instance_prototypes(norm_cam[..., 1:], feats, labels, cfg.tau, cfg.mask_mode)
  k = labels.shape[1]
  ready = state.ready[:k]

  xi = (
      alignment_shift(protos, proto_valid, state.bank_mean, state.ready)
      if cfg.fda
      else jnp.zeros((k, feats.shape[-1]))
  )
  # The instance prototype keeps its gradient where it enters PACAM (as an own neighbour, or
  # through positiveness_grad); neighbour selection itself is discrete and detached.
  anchor = protos
  if cfg.fda and cfg.fda_target in ("anchor", "both"):
    anchor = anchor + cfg.gamma * xi[None]
  pixel_shift = xi if (cfg.fda and cfg.fda_target in ("pixels", "both")) else jnp.zeros_like(xi)
  if cfg.fda and cfg.fda_target not in ("pixels", "anchor", "both"):
    raise ValueError(f"method.cpal.fda_target={cfg.fda_target!r}: choose pixels, anchor or both")

  own = anchor[:, :, None]  # the instance prototype as one more "neighbour"
  if not cfg.neighbours:
    # Table 2's first row: no context, only the image's own prototype (a SIPE-style IS-CAM).
    selected, w = own, jnp.ones(own.shape[:3])
  else:
    top_k = cfg.top_k if cfg.top_k > 0 else state.centers.shape[1]
    idx, sel_ok = select_neighbours(anchor, state.centers[:k], state.center_valid[:k], top_k)
    selected, sel_ok = gather_centers(state.centers, state.center_valid, idx, sel_ok)
    if cfg.positiveness:
      w = positiveness(anchor, selected, sel_ok, cfg.positiveness_metric, cfg.tau_w, cfg.positiveness_grad)
    else:
      w = uniform_weights(sel_ok)
    if cfg.include_instance_proto:
      w0 = cfg.instance_weight
      selected = jnp.concatenate([selected, own], axis=2)
      w = jnp.concatenate([w * (1 - w0), jnp.full(own.shape[:3], w0)], axis=-1)
  w = w * proto_valid[..., None]
  usable = (ready[None] | (not cfg.neighbours)) & proto_valid
  fg = prototype_cam(feats, selected, w, pixel_shift, cfg.gamma) * usable[:, None, None, :]
  fg = sipe.max_normalize(fg * mask[..., 1:])

  if cfg.bg_mode == "sipe_bg":
    seed_feat = feats if bg_feature is None else bg_feature
    seeds = sipe.structure_seeds(norm_cam, seed_feat, mask)
    bg_proto = sipe.class_prototypes(seeds[..., :1], feats)  # [B, 1, D]
    bg = sipe.max_normalize(sipe.cosine_cam(feats, bg_proto)) * mask[..., :1]
  elif cfg.bg_mode == "one_minus_max":
    bg = (1.0 - jnp.max(fg, axis=-1, keepdims=True)) * mask[..., :1]
  else:
    raise ValueError(f"method.cpal.bg_mode={cfg.bg_mode!r}: choose sipe_bg or one_minus_max")
  pacam = jnp.concatenate([bg, fg], axis=-1)
  # Channels L_self may compare: present classes that have context prototypes, and the background
  # of images that have at least one (none during the cold start: L_BCE alone, METHOD.md 3.4).
  loss_mask = jnp.concatenate([jnp.any(usable, axis=-1, keepdims=True), usable], axis=-1)
  return {
      "norm_cam": norm_cam,
      "pacam": pacam,
      "protos": protos,
      "proto_valid": proto_valid,
      "loss_mask": loss_mask,
  }


def self_loss(norm_cam, pacam, loss_mask):
  """Eq. 14: mean L1 between the normalised CAM and PACAM over (b, h, w, c), background included.

  Same reduction as SIPE's L_GSC (absent classes count, at zero); channels without context
  prototypes yet (cold start) contribute nothing rather than pulling the CAM to zero.
  """
  return jnp.mean(jnp.abs(norm_cam - pacam) * loss_mask[:, None, None, :].astype(norm_cam.dtype))


def push_prototypes(state: CPALState, protos, proto_valid) -> CPALState:
  """Eq. 5: the detached instance prototypes of the whole (global) batch enter the FIFO banks."""
  return state.replace(bank=bank_lib.push(state.bank, jax.lax.stop_gradient(protos), proto_valid))
