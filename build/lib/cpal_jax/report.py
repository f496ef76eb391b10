"""The visual report of a run: workdir/report/*.png, linked from summary.md.

summary.json says how good the seeds and masks are, not why. A WSSS run is judged by looking: where
the CAM fires (the object, its context, or one discriminative part), what the seed map adds, what
refinement and the segmentation network keep, which classes fail, how much of the seed score rides
on the oracle background threshold, and, for CPAL, whether the context prototypes really stand for
different parts or sub-types of a class as the paper's Fig. 5 claims. Each figure answers one of
these questions from what earlier stages left in the workdir:

  grid            input | CAM | seed map | pseudo mask | segmentation | ground truth, per image
  seg_grid        input | segmentation | ground truth on data.val_split, where eval_seg predicts
  threshold_sweep seed mIoU against the background threshold t (maps without background only)
  per_class_iou   per-class IoU of every scored stage, grouped bars
  prototypes      CPAL only: which context prototype is nearest to each pixel of a class's CAM
                  region, and the response maps of the three prototypes Eq. 6 would pick

A figure, or a grid column, whose inputs are missing is left out rather than failing: the report
runs after any prefix of the pipeline, and a workdir holding only summary.json still gets its
charts. Only process 0 writes; PNGs are replaced atomically. Matplotlib is driven through the Agg
canvas directly, never pyplot, so no global backend state or figure registry is touched.
The caller decides whether to report at all (config.report.enabled).
"""

import dataclasses
import logging
import os
import time

import jax
import numpy as np

from cpal_jax import image_ops, paths, run_record
from cpal_jax.data import palette, pipeline, synthetic
from cpal_jax.infer import cam as infer_cam
from cpal_jax.infer import network
from cpal_jax.models import cam_net
from cpal_jax.parallel import distributed, sharding
from cpal_jax.train import state as state_lib

log = logging.getLogger(__name__)

DPI = 100
CELL_INCHES = 1.7
# Stages in pipeline order, with the label and summary key of their mIoU.
STAGES = (
    ("seed", "Seed", "seed_miou"),
    ("crf", "w/ CRF", "crf_miou"),
    ("mask", "Mask", "mask_miou"),
    ("seg", "Seg (val)", "seg_val_miou"),
)
PROTO_ROWS = 3  # images in the prototype figure
PROTO_TOP = 3  # individual prototype maps per image


def write_report(config, workdir: str) -> dict[str, str]:
  """Writes the figures the workdir has inputs for; returns {name: path relative to workdir}."""
  if not distributed.is_main():
    return {}
  t0 = time.time()
  summary = run_record.read(workdir)
  figures: dict[str, str] = {}
  views, net = _load_views(config, workdir, config.data.eval_split, with_net=True)
  if views:
    figures["grid"] = _save(_grid_figure(config, views), workdir, "grid")
  # eval_seg predicts data.val_split, which rarely shares images with data.eval_split (VOC: val vs
  # train): its predictions get their own grid rather than an empty column in the first one.
  if config.data.val_split != config.data.eval_split and os.path.isdir(paths.seg_pred(workdir)):
    val_views, _ = _load_views(config, workdir, config.data.val_split, with_net=False)
    if any(v.seg is not None for v in val_views):
      figures["seg_grid"] = _save(_grid_figure(config, val_views), workdir, "seg_grid")
  if summary.get("seed_sweep"):
    figures["threshold_sweep"] = _save(_sweep_figure(config, summary), workdir, "threshold_sweep")
  if any(isinstance(v, dict) and v for v in (summary.get("per_class_iou") or {}).values()):
    figures["per_class_iou"] = _save(_bars_figure(config, summary), workdir, "per_class_iou")
  rows = _prototype_rows(config, views, net) if views and net is not None else []
  if rows:
    figures["prototypes"] = _save(_prototype_figure(config, rows), workdir, "prototypes")
  log.info(
      "report: %s in %s (%.1f s)", ", ".join(figures) or "nothing", paths.report(workdir), time.time() - t0
  )
  return figures


# --------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class View:
  """One image and every map of it the workdir holds (None where a stage has not run)."""

  id: str
  image: np.ndarray  # uint8 [H, W, 3]
  label: np.ndarray  # multi-hot over foreground classes
  gt: np.ndarray | None = None  # [H, W] class ids, 255 ignore
  cam: tuple[np.ndarray, np.ndarray] | None = None  # (keys, [K, H, W]) single-scale, max-normalised
  seed: tuple[np.ndarray, np.ndarray] | None = None  # (keys, [K, H, W]) from make_cam
  mask: np.ndarray | None = None  # pseudo mask
  seg: np.ndarray | None = None  # segmentation prediction
  norm_cam: np.ndarray | None = None  # [h, w, C-1] at feature resolution, valid cells only
  feats: np.ndarray | None = None  # [h, w, D] projected features, valid cells only


@dataclasses.dataclass
class Net:
  """What the prototype figure needs from the CAM checkpoint (host arrays)."""

  centers: np.ndarray | None  # [K_pad, Kc, D]; None for methods without context prototypes
  center_valid: np.ndarray | None
  bank_mean: np.ndarray | None
  ready: np.ndarray | None


def _label_png(path: str) -> np.ndarray | None:
  return palette.load_label_png(path) if os.path.exists(path) else None


def _load_views(config, workdir: str, split: str, with_net: bool) -> tuple[list[View], Net | None]:
  """The first report.num_images images of `split` with their maps (and the CAM net's outputs
  with_net); ([], None) when no model-derived map exists (an image and its ground truth alone say
  nothing about the run)."""
  n = int(config.report.num_images)
  if n <= 0:
    return [], None
  try:
    source = pipeline.make_source(config, split, with_mask=True)
    items = [source[i] for i in range(min(n, len(source)))]
  except (ValueError, OSError, KeyError) as e:
    # The data may live elsewhere than where the report runs; the charts need none of it.
    log.warning("report: no images of %s (%s); image figures skipped", split, e)
    return [], None
  views = [View(el["id"], el["image"], el["label"], el.get("mask")) for el in items]
  for v in views:
    path = paths.cam_map(workdir, v.id)
    if os.path.exists(path):
      maps = infer_cam.load_maps(path)
      v.seed = (maps["keys"], maps["high_res"])
    v.mask = _label_png(os.path.join(paths.masks(workdir), f"{v.id}.png"))
    v.seg = _label_png(os.path.join(paths.seg_pred(workdir), f"{v.id}.png"))
  net = _run_network(config, workdir, views) if with_net else None
  if not any(
      v.cam is not None or v.seed is not None or v.mask is not None or v.seg is not None for v in views
  ):
    return [], None
  return views, net


def _run_network(config, workdir: str, views: list[View]) -> Net | None:
  """Single-scale, no-flip forward of the trained CAM net: the ReLU CAM as the network sees one
  image (make_cam's multi-scale seed is the next column), and the projected features."""
  if not os.path.isdir(paths.cam_ckpt(workdir)):
    return None
  try:
    # The mesh make_cam uses: CPAL's class axis is padded to the device count it was saved with.
    model, variables, extra, _ = network.load(config, workdir, sharding.local_mesh(config.mesh.data))
  except FileNotFoundError:
    return None
  # On the host, then one default device: replicated over a mesh of fake CPU devices, the same
  # six images would be computed once per device.
  variables, extra = jax.device_get((variables, extra))

  @jax.jit
  def forward(variables, image, valid):
    out = model.apply(variables, state_lib.normalize_images(image, valid))
    return jax.nn.relu(out["cam"]), cam_net.projected_features(config, out)

  labels = np.stack([v.label for v in views]).astype(np.float32)
  batch = infer_cam.padded_batch([v.image for v in views], labels, config.cam.pad_multiple, len(views))
  cams, feats = jax.device_get(forward(variables, batch["image"], batch["valid"]))
  stride = batch["image"].shape[1] // cams.shape[1]
  for v, cam, feat in zip(views, cams, feats):
    h, w = v.image.shape[:2]
    hv, wv = -(-h // stride), -(-w // stride)
    cam = cam[:hv, :wv] * v.label  # absent classes are not shown, as in every later map
    norm = cam / (cam.reshape(-1, cam.shape[-1]).max(0) + 1e-5)
    keys = infer_cam.channel_keys(v.label, with_bg=False)
    v.cam = (keys, image_ops.resize_bilinear_host(np.moveaxis(norm[..., keys - 1], -1, 0), (h, w)))
    v.norm_cam, v.feats = norm, feat[:hv, :wv]
  if config.method.name != "cpal":
    return Net(None, None, None, None)
  return Net(
      np.asarray(extra.centers),
      np.asarray(extra.center_valid),
      np.asarray(extra.bank_mean),
      np.asarray(extra.ready),
  )


# --------------------------------------------------------------------------- drawing helpers
def _figure(width: float, height: float, **kw):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), dpi=DPI, **kw)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, workdir: str, name: str) -> str:
  """Atomic PNG write: a viewer or a killed run never sees half a figure."""
  path = os.path.join(paths.report(workdir), f"{name}.png")
  with paths.atomic(path) as tmp:
    fig.savefig(tmp, format="png", dpi=DPI)
  return os.path.relpath(path, workdir)


def _gray(image: np.ndarray) -> np.ndarray:
  return np.repeat(image.astype(np.float32).mean(-1, keepdims=True), 3, axis=-1) / 255.0


def heat_overlay(image: np.ndarray, keys: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Continuous class maps as one picture: the VOC colour of the strongest foreground class scaled
  by its score, fading into black (background) as the mask columns do, over a faint copy of the image
  for orientation. A background channel (key 0) is ignored: the mask columns show where it wins.

  At score 1 a pixel has its class's mask colour exactly, so one legend serves every column; a dim
  image keeps the grey VOC classes visible, which any alpha blend over the image would hide.
  """
  fg = keys > 0
  base = 0.15 * _gray(image)
  if not fg.any():
    return (base * 255).astype(np.uint8)
  s = scores[fg]
  strength = np.clip(s.max(0), 0.0, 1.0)[..., None]
  colour = palette.voc_colormap()[keys[fg][np.argmax(s, axis=0)]].astype(np.float32) / 255.0
  return ((base * (1 - strength) + colour * strength) * 255).astype(np.uint8)


def _seed_title(config) -> str:
  m = config.method
  if m.name == "sipe":
    return "IS-CAM seed"
  if m.name == "cpal" and m.cpal.seed_map == "pacam":
    return "PACAM seed"
  if m.name == "cpal" and m.cpal.seed_map == "fused":
    return f"CAM+{m.cpal.fused_lambda}·PACAM"
  return "CAM seed (ms)"


def _class_names(config) -> tuple[str, ...]:
  if config.data.name == "synthetic":
    return synthetic.get_world(config.data.get("world", "default")).class_names
  if config.data.name == "voc":
    from cpal_jax.data import voc

    return tuple(voc.VOC_CLASSES)
  return tuple(str(i) for i in range(config.data.num_classes))


# --------------------------------------------------------------------------- figures
def _grid_figure(config, views: list[View]):
  names = _class_names(config)
  columns = [("input", lambda v: v.image)]
  if any(v.cam is not None for v in views):
    columns.append(("CAM (1 scale)", lambda v: None if v.cam is None else heat_overlay(v.image, *v.cam)))
  if any(v.seed is not None for v in views):
    columns.append(
        (_seed_title(config), lambda v: None if v.seed is None else heat_overlay(v.image, *v.seed))
    )
  for title, attr in (("pseudo mask", "mask"), ("segmentation", "seg"), ("ground truth", "gt")):
    if any(getattr(v, attr) is not None for v in views):
      columns.append(
          (title, lambda v, a=attr: None if getattr(v, a) is None else synthetic.colorize_mask(getattr(v, a)))
      )

  rows, cols = len(views), len(columns)
  fig = _figure(cols * CELL_INCHES, rows * (CELL_INCHES + 0.15) + 0.7)
  axes = fig.subplots(rows, cols, squeeze=False)
  present = set()
  for r, v in enumerate(views):
    classes = np.flatnonzero(v.label) + 1
    present.update(classes.tolist())
    for c, (title, draw) in enumerate(columns):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      pic = draw(v)
      if pic is None:
        ax.text(0.5, 0.5, "missing", ha="center", va="center", fontsize=7, transform=ax.transAxes)
      else:
        ax.imshow(pic, interpolation="nearest")
      if r == 0:
        ax.set_title(title, fontsize=8)
    axes[r, 0].set_ylabel(f"{v.id}\n" + ", ".join(names[k] for k in classes), fontsize=6)
  _class_legend(fig, sorted(present), names)
  fig.subplots_adjust(
      left=0.09,
      right=0.99,
      top=1 - 0.3 / fig.get_figheight(),
      bottom=0.45 / fig.get_figheight(),
      wspace=0.04,
      hspace=0.12,
  )
  return fig


def _class_legend(fig, classes, names) -> None:
  from matplotlib.patches import Patch

  cmap = palette.voc_colormap()
  handles = [Patch(color=cmap[k] / 255.0, label=names[k]) for k in [0] + list(classes)]
  fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)


def _sweep_figure(config, summary: dict):
  sweep = np.asarray(summary["seed_sweep"], np.float64)
  t = np.round(np.arange(len(sweep)) * 0.01, 2)
  fig = _figure(5.5, 3.4)
  ax = fig.add_subplot()
  ax.plot(t, sweep, color="tab:blue", lw=1.5, label="seed mIoU")
  chosen = (summary.get("thresholds") or {}).get("seed")
  if chosen is not None:
    i = int(np.argmin(np.abs(t - chosen)))
    ax.axvline(chosen, color="tab:green", ls="--", lw=1)
    ax.plot([chosen], [sweep[i]], "o", color="tab:green", label=f"chosen t={chosen:.2f}: {sweep[i]:.1f}")
  fixed = config.eval.cam_threshold
  if t[0] <= fixed <= t[-1]:
    i = int(np.argmin(np.abs(t - fixed)))
    ax.axvline(fixed, color="tab:red", ls=":", lw=1)
    ax.plot([fixed], [sweep[i]], "s", color="tab:red", label=f"IRN t={fixed:.2f}: {sweep[i]:.1f}")
  # The trivial predictors eval_cam scores on the same pixels: the floor the curve is read against.
  for (name, v), style in zip((summary.get("baselines") or {}).items(), ("-.", (0, (1, 3)))):
    if v is not None:
      ax.axhline(v, color="gray", ls=style, lw=0.8, label=f"{name}: {v:.1f}")
  ax.set_xlabel("background threshold t")
  ax.set_ylabel("mIoU (%)")
  ax.set_title("Seed mIoU vs background threshold (oracle sweep)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  return fig


def _bars_figure(config, summary: dict):
  per_class = {k: v for k, v in summary["per_class_iou"].items() if isinstance(v, dict) and v}
  known = [s for s, _, _ in STAGES if s in per_class]
  stages = known + sorted(set(per_class) - set(known))
  scored = set(c for s in stages for c in per_class[s])
  # summary.json sorts its keys; the dataset's class order is the one readers know.
  classes = [c for c in _class_names(config) if c in scored] + sorted(scored - set(_class_names(config)))
  labels = {s: (lab, key) for s, lab, key in STAGES}
  n, m = len(classes), len(stages)
  width = 0.8 / m
  fig = _figure(min(40.0, max(6.0, 1.5 + n * (0.16 * m + 0.2))), 3.8)
  ax = fig.add_subplot()
  x = np.arange(n)
  for j, s in enumerate(stages):
    vals = np.array([np.nan if per_class[s].get(c) is None else per_class[s][c] for c in classes], np.float64)
    label, key = labels.get(s, (s, None))
    miou = summary.get(key) if key else None
    pos = x + (j - (m - 1) / 2) * width
    ax.bar(pos, np.nan_to_num(vals), width, label=label if miou is None else f"{label} (mIoU {miou:.1f})")
    # null IoU: the class has no pixels in ground truth or prediction; not the same as 0.
    for xi in pos[np.isnan(vals)]:
      ax.text(xi, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=5, color="gray")
  ax.set_xticks(x)
  ax.set_xticklabels(classes, rotation=45 if n > 10 else 0, ha="right" if n > 10 else "center", fontsize=7)
  ax.set_ylim(0, 100)
  ax.set_ylabel("IoU (%)")
  ax.set_title("Per-class IoU by stage", fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=7, ncol=m, loc="upper right")
  fig.tight_layout()
  return fig


# --------------------------------------------------------------------------- prototypes (Fig. 5)
@dataclasses.dataclass
class ProtoRow:
  view: View
  cls: int  # class id (1-based)
  region: np.ndarray  # [H, W] bool: the class's CAM region (Eq. 4's mask, upsampled)
  nearest: np.ndarray  # [H, W] cluster index of the most similar context prototype, -1 outside
  top: list[tuple[int, float, np.ndarray]]  # (cluster index, cos to the anchor, ReLU cos map [H, W])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[..., D] x [N, D] -> [..., N]."""
  an = np.linalg.norm(a, axis=-1, keepdims=True)
  bn = np.linalg.norm(b, axis=-1)
  return (a @ b.T) / np.maximum(an * bn, 1e-8)


def _prototype_rows(config, views: list[View], net: Net) -> list[ProtoRow]:
  """Up to PROTO_ROWS images, each with its present class of largest CAM region among the classes
  that have context prototypes. The features are shifted by Eq. 12's xi as PACAM shifts them
  (one image as the batch), so the maps show what Eq. 13 compares."""
  if net.centers is None:
    return []
  p = config.method.cpal
  rows = []
  for v in views:
    if len(rows) == PROTO_ROWS or v.feats is None:
      break
    usable = [
        c
        for c in np.flatnonzero(v.label) + 1
        if net.ready[c - 1] and net.center_valid[c - 1].any() and (v.norm_cam[..., c - 1] > p.tau).any()
    ]
    if not usable:
      continue
    cls = max(usable, key=lambda c: int((v.norm_cam[..., c - 1] > p.tau).sum()))
    region_lo = v.norm_cam[..., cls - 1] > p.tau
    proto = v.feats[region_lo].mean(0)  # Eq. 4
    xi = (net.bank_mean[cls - 1] - proto) if p.fda else np.zeros_like(proto)
    anchor = proto + p.gamma * xi if p.fda and p.fda_target in ("anchor", "both") else proto
    feats = v.feats + p.gamma * xi if p.fda and p.fda_target in ("pixels", "both") else v.feats
    idx = np.flatnonzero(net.center_valid[cls - 1])
    centers = net.centers[cls - 1, idx]
    h, w = v.image.shape[:2]
    sim = image_ops.resize_bilinear_host(np.moveaxis(_cosine(feats, centers), -1, 0), (h, w))  # [N, H, W]
    region = image_ops.resize_bilinear_host(v.norm_cam[None, ..., cls - 1], (h, w))[0] > p.tau
    nearest = np.where(region, idx[np.argmax(sim, axis=0)], -1)
    anchor_cos = _cosine(anchor, centers)
    order = np.argsort(-anchor_cos)[:PROTO_TOP]  # Eq. 6's ranking
    top = [(int(idx[j]), float(anchor_cos[j]), np.maximum(sim[j], 0.0)) for j in order]
    rows.append(ProtoRow(v, int(cls), region, nearest, top))
  return rows


def _prototype_figure(config, rows: list[ProtoRow]):
  import matplotlib
  from matplotlib.patches import Patch

  names = _class_names(config)
  cols = 2 + PROTO_TOP
  fig = _figure(cols * CELL_INCHES, len(rows) * (CELL_INCHES + 0.75) + 0.4, layout="constrained")
  axes = fig.subplots(len(rows), cols, squeeze=False)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  tab = matplotlib.colormaps["tab20"]
  heat = matplotlib.colormaps["inferno"]
  for r, row in enumerate(rows):
    v = row.view
    gray = _gray(v.image)
    ax = axes[r, 0]
    ax.imshow(np.where(row.region[..., None], v.image, (0.3 * v.image).astype(np.uint8)))
    ax.set_title(f"{v.id}\n{names[row.cls]}: CAM > {config.method.cpal.tau}", fontsize=7)

    # Winners ranked by area, so the largest parts get the most distinct colours.
    ids, counts = np.unique(row.nearest[row.nearest >= 0], return_counts=True)
    ranked = ids[np.argsort(-counts)]
    frac = dict(zip(ids.tolist(), (counts / max(counts.sum(), 1)).tolist()))
    # tab20 pairs dark and light shades of a hue: all dark ones first, so the top ten differ in hue.
    shade = list(range(0, 20, 2)) + list(range(1, 20, 2))
    colours = {int(k): np.asarray(tab(shade[i % 20])[:3]) for i, k in enumerate(ranked)}
    pic = 0.35 * gray
    for k, col in colours.items():
      pic = np.where((row.nearest == k)[..., None], 0.25 * gray + 0.75 * col, pic)
    ax = axes[r, 1]
    ax.imshow(pic, interpolation="nearest")
    ax.set_title("nearest context\nprototype", fontsize=7)
    handles = [Patch(color=colours[int(k)], label=f"#{k} {100 * frac[int(k)]:.0f}%") for k in ranked[:6]]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=2,
        fontsize=6,
        frameon=False,
        handlelength=1.0,
        columnspacing=0.6,
    )

    # One colour scale per row: the prototypes of a class are compared with each other, and the
    # features' cosines often span a narrow band (F_hie is not centred) that a fixed 0..1 would flatten.
    lo = min(float(m.min()) for _, _, m in row.top)
    hi = max(max(float(m.max()) for _, _, m in row.top), lo + 1e-3)
    im = None
    for j in range(PROTO_TOP):
      ax = axes[r, 2 + j]
      if j >= len(row.top):
        ax.axis("off")
        continue
      k, cos, response = row.top[j]
      im = ax.imshow(response, cmap=heat, vmin=lo, vmax=hi, interpolation="bilinear")
      ax.contour(row.region, levels=[0.5], colors="cyan", linewidths=0.6)
      ax.set_title(f"prototype #{k}\ncos to p = {cos:.2f}", fontsize=7)
    cb = fig.colorbar(im, ax=axes[r, 2:], shrink=0.85, pad=0.01)
    cb.ax.tick_params(labelsize=6)
    cb.set_label("ReLU(cos)", fontsize=6)
  fig.suptitle(f"Context prototypes of {config.method.name} (cf. CPAL Fig. 5)", fontsize=9)
  return fig
