"""refine: the CRF-only path improves noisy seeds and resumes; the random walk of one image is the
same with and without bucket padding; IR labels keep 255 for the unsure band."""

import os

import numpy as np

from cpal_jax import paths
from cpal_jax.data import palette
from cpal_jax.refine import stage as refine
from test_export import write_gt_maps
from test_train import tiny_config


def test_crf_mode_refines_noisy_seeds_and_resumes(tmp_path):
  config = tiny_config(**{"refine.mode": "crf", "refine.workers": 2})
  workdir = str(tmp_path)
  source = write_gt_maps(config, workdir, noise=1.2, seed=3)
  from cpal_jax.eval import seed as seed_eval

  seed = seed_eval.evaluate(config, workdir)["seed_miou"]
  out = refine.run(config, workdir)
  assert out["crf_miou"] > seed + 5, (seed, out["crf_miou"])
  files = sorted(os.listdir(paths.crf_masks(workdir)))
  assert len(files) == len(source)
  os.remove(os.path.join(paths.crf_masks(workdir), files[2]))
  mtime = os.stat(os.path.join(paths.crf_masks(workdir), files[0])).st_mtime_ns
  again = refine.run(config, workdir)
  assert again["crf_miou"] == out["crf_miou"]
  assert os.stat(os.path.join(paths.crf_masks(workdir), files[0])).st_mtime_ns == mtime


def test_ir_labels_are_class_ids_with_unsure_band(tmp_path):
  config = tiny_config(**{"refine.workers": 1, "data.num_train": 4})
  workdir = str(tmp_path)
  source = write_gt_maps(config, workdir)
  refine.make_ir_labels(config, workdir, config.data.train_split, source)
  el = pipeline_item(config, 1)
  lab = palette.load_label_png(os.path.join(paths.ir_labels(workdir), f"{el['id']}.png"))
  assert lab.shape == el["mask"].shape
  present = set(np.flatnonzero(el["label"]) + 1) | {0, 255}
  assert set(np.unique(lab)) <= present
  # Perfect seeds: every confident pixel agrees with the ground truth.
  sure = lab != 255
  assert np.mean(lab[sure] == el["mask"][sure]) > 0.97
  assert len(os.listdir(paths.ir_labels(workdir))) == len(source)


def pipeline_item(config, i):
  from cpal_jax.data import pipeline

  return pipeline.make_source(config, config.data.train_split, with_mask=True)[i]


def test_walk_is_unchanged_by_bucket_padding():
  config = tiny_config(**{"refine.walk.exp_times": 4})
  rng = np.random.default_rng(0)
  h, w = 13, 18
  maps = {"keys": np.array([2, 5]), "cam": rng.random((2, h, w)).astype(np.float32)}
  edge = rng.random((h, w)).astype(np.float32) ** 3
  a = refine.walk_labels(config, maps, edge, (4 * h - 2, 4 * w - 3), bucket=1)
  b = refine.walk_labels(config, maps, edge, (4 * h - 2, 4 * w - 3), bucket=16)
  np.testing.assert_array_equal(a, b)
  assert set(np.unique(a)) <= {0, 2, 5} and a.shape == (4 * h - 2, 4 * w - 3)
  with_bg = {"keys": np.array([0, 2]), "cam": rng.random((2, h, w)).astype(np.float32)}
  c = refine.walk_labels(config, with_bg, edge, (4 * h, 4 * w), bucket=16)
  assert set(np.unique(c)) <= {0, 2}


def np_make_sem_seg_labels(
    cams, keys, edge, size, *, beta, exp_times, radius, bg_threshold=None, power=None, plane_first=False
):
  """IRN's make_sem_seg_labels / SIPE's make_seg_labels after the edge map: (SIPE: the whole map
  to `power`), the walk, x4 bilinear upsampling (torch), crop, / global max, (IRN: a constant
  `bg_threshold` plane prepended after the normalisation; plane_first: before it, a variant), argmax,
  keys."""
  import torch
  import torch.nn.functional as F

  from cpal_jax.refine import random_walk

  if power is not None:
    cams = np.power(cams, power)
  rw = np.array(random_walk.random_walk(cams, edge, beta=beta, exp_times=exp_times, radius=radius))
  rw_up = F.interpolate(torch.from_numpy(rw)[None], scale_factor=4, mode="bilinear", align_corners=False)
  rw_up = rw_up[0, :, : size[0], : size[1]]
  if not plane_first:
    rw_up = rw_up / torch.max(rw_up)
  if bg_threshold is not None:
    rw_up = F.pad(rw_up, (0, 0, 0, 0, 1, 0), value=bg_threshold)
    keys = np.pad(keys, (1, 0))
  if plane_first:
    rw_up = rw_up / torch.max(rw_up)
  return keys[torch.argmax(rw_up, dim=0).numpy()]


def walk_case(channels, seed):
  """Blobby maps (so the walk has regions to spread) and an edge map with a wall in it."""
  rng = np.random.default_rng(seed)
  h, w = 12, 17
  yy, xx = np.mgrid[:h, :w]
  blob = lambda: np.exp(-((yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2) / rng.uniform(8, 30))
  cams = np.stack([blob() for _ in range(channels)])
  cams = (cams * rng.uniform(0.4, 1.0, (channels, 1, 1)) + 0.05 * rng.random(cams.shape)).astype(np.float32)
  edge = (0.6 * rng.random((h, w)) ** 4).astype(np.float32)
  edge[:, 8] = 0.9
  return cams, edge, (4 * h - 3, 4 * w - 2)


def test_walk_background_is_irns_constant_plane_after_the_normalisation():
  """Foreground-only maps: IRN's sem_seg_bg_thres plane (0.25) joins the walked, max-normalised maps."""
  config = tiny_config(**{"refine.walk.exp_times": 4})
  w = config.refine.walk
  assert w.bg_threshold == 0.25
  cams, edge, size = walk_case(2, 0)
  keys = np.array([2, 5])
  got = refine.walk_labels(config, {"keys": keys, "cam": cams}, edge, size, bucket=16)
  kw = dict(beta=w.beta, exp_times=w.exp_times, radius=w.radius)
  want = np_make_sem_seg_labels(cams, keys, edge, size, bg_threshold=0.25, **kw)
  np.testing.assert_array_equal(got, want)
  assert set(np.unique(got).tolist()) == {0, 2, 5}
  # The case tells the variants apart: another constant, the plane inside the normalisation, or
  # no plane at all would give other labels.
  assert (np_make_sem_seg_labels(cams, keys, edge, size, bg_threshold=0.35, **kw) != want).any()
  assert (np_make_sem_seg_labels(cams, keys, edge, size, bg_threshold=0.15, **kw) != want).any()
  plane_first = np_make_sem_seg_labels(cams, keys, edge, size, bg_threshold=0.25, plane_first=True, **kw)
  assert (plane_first != want).any()
  assert (np_make_sem_seg_labels(cams, keys, edge, size, **kw) != want).any()


def test_walk_of_maps_with_background_raises_them_to_bg_power():
  """Maps with their own background channel (SIPE): the whole map ** 1.5 is walked, no constant."""
  config = tiny_config(**{"refine.walk.exp_times": 4})
  w = config.refine.walk
  assert w.bg_power == 1.5
  cams, edge, size = walk_case(3, 1)
  cams[0] = 0.3 + 0.5 * cams[0]  # a broad background channel
  keys = np.array([0, 2, 5])
  got = refine.walk_labels(config, {"keys": keys, "cam": cams}, edge, size, bucket=16)
  kw = dict(beta=w.beta, exp_times=w.exp_times, radius=w.radius)
  want = np_make_sem_seg_labels(cams, keys, edge, size, power=1.5, **kw)
  np.testing.assert_array_equal(got, want)
  assert set(np.unique(got).tolist()) == {0, 2, 5}
  # The case tells the variants apart: no power, another power, or the power on the background
  # channel alone would give other labels.
  assert (np_make_sem_seg_labels(cams, keys, edge, size, power=1.0, **kw) != want).any()
  assert (np_make_sem_seg_labels(cams, keys, edge, size, power=2.0, **kw) != want).any()
  bg_only = cams.copy()
  bg_only[0] = bg_only[0] ** 1.5
  assert (np_make_sem_seg_labels(bg_only, keys, edge, size, **kw) != want).any()


def test_host_post_processing_equals_the_jax_one():
  from cpal_jax import image_ops
  from cpal_jax.refine import random_walk

  rw = np.random.default_rng(2).random((3, 9, 11)).astype(np.float32)
  ref = np.asarray(random_walk.to_mask_scores(rw, (34, 41)))
  host = image_ops.resize_bilinear_host(rw, (36, 44))[:, :34, :41]
  np.testing.assert_allclose(host / host.max(), ref, rtol=1e-5, atol=1e-6)


def test_ir_label_mode_exports_sipe_coco_pseudo_masks_with_unsure_pixels(tmp_path):
  """refine.mode=ir_label (SIPE's COCO path): no boundary net; the IR labels are the pseudo masks,
  exported with 255 kept for the segmentation loss to ignore, scored with 255 as background."""
  from cpal_jax.infer import export

  config = tiny_config(**{"refine.mode": "ir_label", "refine.workers": 1, "data.num_train": 4, "data.num_eval": 4})
  config.cam.split = config.data.train_split
  workdir = str(tmp_path)
  write_gt_maps(config, workdir, noise=0.6, seed=1)
  out = refine.run(config, workdir)
  assert out["refine"]["mode"] == "ir_label" and out["crf_miou"] is not None
  assert not os.path.exists(paths.irn_ckpt(workdir))  # no boundary network
  result = export.run(config, workdir)
  ids = sorted(f for f in os.listdir(paths.masks(workdir)) if f.endswith(".png"))
  unsure = 0
  for f in ids:
    exported = palette.load_label_png(os.path.join(paths.masks(workdir), f))
    ir = palette.load_label_png(os.path.join(paths.ir_labels(workdir), f))
    np.testing.assert_array_equal(exported, ir)
    unsure += int((exported == 255).sum())
  assert unsure > 0  # the band the two CRFs disagree on survives the export
  assert 0 <= result["mask_miou"] <= 100
