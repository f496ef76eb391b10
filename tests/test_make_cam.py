"""make_cam: host resizes, flip/scale fusion on a model with known outputs, files, resume; eval_cam
reading them."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cpal_jax import image_ops, paths
from cpal_jax import stages as cli
from cpal_jax.eval import seed as seed_eval
from cpal_jax.infer import cam as infer_cam
from cpal_jax.train import state as state_lib
from test_train import tiny_config, tree_state


@pytest.mark.parametrize("size", [(12, 20), (4, 5), (7, 9), (3, 13)])
def test_host_bilinear_matches_torch(size):
  x = np.random.default_rng(0).random((3, 7, 9)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size, mode="bilinear", align_corners=False)
  np.testing.assert_allclose(image_ops.resize_bilinear_host(x, size), ref[0].numpy(), atol=1e-6)


class _PoolModel:
  """Stand-in CAM network: the CAM is the 4x4-average-pooled red channel, repeated per class, with
  a per-class gain; flip-equivariant, so flip-summing must give twice the map of the image."""

  gains = jnp.array([1.0, -1.0, 2.0])

  def apply(self, variables, x):
    b, h, w, _ = x.shape
    pooled = x[..., :1].reshape(b, h // 4, 4, w // 4, 4, 1).mean((2, 4))
    cam = pooled * self.gains
    return {"cam": cam, "hie": jnp.zeros((b, h // 4, w // 4, 2)), "score": cam.mean((1, 2))}


def test_predict_flip_sum_and_label_mask_on_known_model():
  config = tiny_config(**{"method.name": "cam"})
  predict = infer_cam.make_predict(_PoolModel(), config)
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, (2, 16, 24, 3)).astype(np.uint8)
  valid = np.ones((2, 16, 24), np.uint8)
  label = np.zeros((2, 9), np.float32)
  label[:, [0, 2]] = 1  # class 2 (gain -1) is absent anyway; its ReLU would be 0 too
  label = label[:, :3]
  out = np.asarray(predict({}, None, {"image": image, "valid": valid, "label": label}))
  from cpal_jax.train.state import normalize_images

  norm = np.asarray(normalize_images(jnp.asarray(image), jnp.asarray(valid)))
  pooled = norm[..., 0].reshape(2, 4, 4, 6, 4).mean((2, 4))
  expected = 2 * np.maximum(pooled[..., None] * np.array([1.0, -1.0, 2.0]), 0) * label[:, None, None, :]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


class _RampModel(_PoolModel):
  """The pooled red channel times a left-to-right ramp from -1 to 1: the flipped view's CAM, flipped
  back, is the negative of the image's."""

  def apply(self, variables, x):
    out = super().apply(variables, x)
    ramp = jnp.linspace(-1.0, 1.0, out["cam"].shape[2])[None, None, :, None]
    return {**out, "cam": out["cam"] * ramp}


@pytest.mark.parametrize("model_cls", [_PoolModel, _RampModel])
def test_plain_cam_is_read_as_irn_whatever_the_flip_fusion(model_cls):
  """The plain CAM is IRN's read, ReLU(view) + ReLU(flipped view) flipped back, under either
  cam.flip_fusion (which only concerns the reads with a background channel): on the ramp network,
  whose flipped view cancels it, averaging the outputs first would give 0."""
  rng = np.random.default_rng(2)
  batch = {
      "image": rng.integers(0, 255, (2, 16, 24, 3)).astype(np.uint8),
      "valid": np.ones((2, 16, 24), np.uint8),
      "label": np.array([[1, 0, 1], [1, 1, 0]], np.float32),
  }
  model = model_cls()
  x = np.asarray(state_lib.normalize_images(jnp.asarray(batch["image"]), jnp.asarray(batch["valid"])))
  a, b = model.apply({}, x)["cam"], model.apply({}, x[:, :, ::-1])["cam"][:, :, ::-1]
  want = (np.maximum(a, 0) + np.maximum(b, 0)) * batch["label"][:, None, None, :]
  for fusion in ("maps", "features"):
    config = tiny_config(**{"method.name": "cam", "cam.flip_fusion": fusion})
    assert infer_cam.flip_fusion(config) == "maps"
    got = np.asarray(infer_cam.make_predict(model, config)({}, None, batch))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.abs(want).max() > 0.1
  with pytest.raises(ValueError, match="flip_fusion"):
    infer_cam.make_predict(model, tiny_config(**{"method.name": "cam", "cam.flip_fusion": "both"}))


def test_cpal_maps_do_not_depend_on_the_inference_batch():
  """PACAM with alignment (Eq. 12) of an image alone equals its maps inside a batch of others (the
  default method.cpal.infer_shift=image; with "batch" they differ by ~6e-3 here, and
  tests/test_cpal.py shows the two scopes apart on the maps themselves)."""
  import jax

  from cpal_jax.parallel import sharding
  from cpal_jax.train import cam as cam_stage

  config = tiny_config(**{"method.name": "cpal"})
  setup = cam_stage.build(config, sharding.make_mesh(1), 64)
  state = setup.init_state()
  k = jax.random.split(jax.random.key(3), 2)
  extra = state.extra.replace(  # a clustered, ready bank, as after the first epoch
      centers=jax.random.normal(k[0], state.extra.centers.shape),
      center_valid=jnp.ones_like(state.extra.center_valid),
      bank_mean=jax.random.normal(k[1], state.extra.bank_mean.shape),
      ready=jnp.ones_like(state.extra.ready),
  )
  predict = infer_cam.make_predict(setup.model, config)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  rng = np.random.default_rng(0)
  eye = np.eye(config.data.num_classes - 1, dtype=np.float32)
  batch = {
      "image": rng.integers(0, 255, (3, 32, 32, 3)).astype(np.uint8),
      "valid": np.ones((3, 32, 32), np.uint8),
      "label": eye[[0, 0, 4]] + eye[[1, 1, 1]],  # classes 1 and 2 shared, so batch means mix images
  }
  together = np.asarray(predict(variables, extra, batch))[:1]
  alone = np.asarray(predict(variables, extra, {k: v[:1] for k, v in batch.items()}))
  assert np.abs(alone).max() > 0.5  # PACAM channels present, not all zero
  np.testing.assert_allclose(together, alone, atol=1e-5)


def test_fusion_sums_scales_at_image_size_then_normalises():
  a = np.full((2, 3, 4), 0.5, np.float32)
  b = np.full((2, 6, 8), 1.5, np.float32)
  b[1] = 3.0
  fused = infer_cam.fuse_scales([a, b], (12, 16))
  np.testing.assert_allclose(fused[0], 2.0)
  np.testing.assert_allclose(fused[1], 3.5)
  norm = infer_cam.normalise(fused)
  np.testing.assert_allclose(norm.max((1, 2)), 1.0, atol=1e-4)


def test_plain_cam_high_res_is_enlarged_to_the_stride_multiple_and_cropped_as_irn():
  """IRN's make_cam.py: F.interpolate to get_strided_up_size(size, 16), summed, [:, :H, :W]."""
  rng = np.random.default_rng(0)
  maps = [rng.random((3, 5, 4)).astype(np.float32), rng.random((3, 8, 6)).astype(np.float32)]
  size = (75, 61)
  up = ((75 - 1) // 16 * 16 + 16, (61 - 1) // 16 * 16 + 16)
  want = sum(
      torch.nn.functional.interpolate(torch.from_numpy(m)[:, None], up, mode="bilinear", align_corners=False)
      for m in maps
  )[:, 0, : size[0], : size[1]].numpy()
  got = infer_cam.fuse_scales(maps, size, up_multiple=16)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(infer_cam.fuse_scales(maps, size) - want).max() > 1e-2  # straight to size differs
  config = tiny_config(**{"method.name": "cam"})
  assert infer_cam.high_res_multiple(config) == 2 * np.prod(config.model.strides)
  assert infer_cam.high_res_multiple(tiny_config(**{"method.name": "sipe"})) == 0  # SIPE's: straight


def test_rescale_rounds_like_irn():
  im = np.zeros((375, 500, 3), np.uint8)
  assert infer_cam.rescale(im, 0.5).shape == (188, 250, 3)
  assert infer_cam.rescale(im, 1.5).shape == (562, 750, 3)  # round half to even, as np.round
  assert infer_cam.rescale(im, 1.0) is im


@pytest.fixture(scope="module")
def sipe_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("make_cam"))
  config = tiny_config(**{"train.num_steps": 2, "cam.scales": (1.0, 0.5, 1.5), "cam.write_npy": True})
  summary = cli.run(config, workdir)
  return config, workdir, summary


def test_files_hold_present_classes_with_background(sipe_run):
  config, workdir, summary = sipe_run
  from cpal_jax.data import pipeline

  source = pipeline.make_source(config, config.data.train_split)
  assert summary["make_cam"]["written"] == len(source) == len(os.listdir(paths.cam_maps(workdir))) // 2
  for i in (0, 5):
    el = source[i]
    m = infer_cam.load_maps(paths.cam_map(workdir, el["id"]))
    np.testing.assert_array_equal(m["keys"], np.concatenate([[0], np.flatnonzero(el["label"]) + 1]))
    h, w = el["image"].shape[:2]
    assert m["high_res"].shape == (len(m["keys"]), h, w)
    assert m["cam"].shape == (len(m["keys"]), -(-h // 4), -(-w // 4))
    # Max-normalised per channel; after 2 steps any channel, background included, may be all zero.
    peaks = m["high_res"].max((1, 2))
    assert m["high_res"].min() >= 0 and np.all((np.abs(peaks - 1) < 2e-3) | (peaks == 0))
    npy = np.load(paths.cam_map(workdir, el["id"])[:-4] + ".npy", allow_pickle=True).item()
    np.testing.assert_array_equal(npy["keys"], m["keys"])
    np.testing.assert_array_equal(npy["IS_CAM"], npy["high_res"])  # SIPE's cam2ir.py reads this key
  lit = [infer_cam.load_maps(paths.cam_map(workdir, i))["high_res"].max() for i in source.ids()]
  assert np.mean(np.asarray(lit) > 0.99) > 0.5  # most images have a channel at its peak
  assert summary["seed_miou"] is not None and summary["thresholds"]["seed"] is None


def test_rerun_skips_finished_maps_and_rewrites_a_missing_one_identically(sipe_run, tmp_path):
  config, shared, _ = sipe_run
  shared_before = tree_state(shared)
  workdir = str(tmp_path / "w")
  shutil.copytree(shared, workdir)  # a copy (mtimes kept): the module's run stays as made
  files = sorted(f for f in os.listdir(paths.cam_maps(workdir)) if f.endswith(".npz"))
  victim = paths.cam_map(workdir, files[3][:-4])
  with open(victim, "rb") as f:
    before = f.read()
  os.remove(victim)
  keep = paths.cam_map(workdir, files[0][:-4])
  mtime = os.stat(keep).st_mtime_ns
  out = infer_cam.run(config, workdir)
  assert out["make_cam"]["written"] == 1
  assert os.stat(keep).st_mtime_ns == mtime
  with open(victim, "rb") as f:
    assert np.array_equal(np.load(victim)["high_res"], np.load(__import__("io").BytesIO(before))["high_res"])
  assert not [f for f in os.listdir(paths.cam_maps(workdir)) if ".tmp" in f]
  assert tree_state(shared) == shared_before


def test_eval_cam_names_a_corrupt_file_and_the_fix(sipe_run, tmp_path):
  config, workdir, _ = sipe_run
  import shutil

  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  from cpal_jax.data import pipeline

  first = pipeline.make_source(config, config.data.eval_split).ids()[0]
  with open(paths.cam_map(copy, first), "wb") as f:
    f.write(b"not a zip")
  with pytest.raises(ValueError, match=f"{first}.npz.*re-run the make_cam"):
    seed_eval.evaluate(config, copy)
  os.remove(paths.cam_map(copy, first))
  with pytest.raises(FileNotFoundError, match="run the make_cam stage"):
    seed_eval.evaluate(config, copy)


def test_another_read_of_existing_maps_is_refused_and_keeps_them(sipe_run, tmp_path):
  config, workdir, _ = sipe_run
  import json
  import shutil

  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  with open(paths.cam_protocol(copy)) as f:
    record = json.load(f)
  assert record["scales"] == [1.0, 0.5, 1.5] and record["checkpoint_step"] == 2
  assert record["method.name"] == "sipe" and "batch_size" not in record
  before = {
      f: os.stat(os.path.join(paths.cam_maps(copy), f)).st_mtime_ns
      for f in os.listdir(paths.cam_maps(copy))
  }
  for key, value in (("cam.scales", (1.0,)), ("cam.flip_fusion", "maps"), ("method.cpal.tau", 0.3)):
    other = tiny_config(
        **{"train.num_steps": 2, "cam.scales": (1.0, 0.5, 1.5), "cam.write_npy": True, key: value}
    )
    name = key.split(".", 1)[1] if key.startswith("cam.") else key
    with pytest.raises(ValueError, match=rf"{name}: .* then, .* now.*delete .*maps"):
      infer_cam.run(other, copy)
  after = {
      f: os.stat(os.path.join(paths.cam_maps(copy), f)).st_mtime_ns
      for f in os.listdir(paths.cam_maps(copy))
  }
  assert after == before
  # Once the maps are gone, the new read is recorded and made.
  shutil.rmtree(paths.cam_maps(copy))
  os.makedirs(paths.cam_maps(copy))
  other = tiny_config(**{"train.num_steps": 2, "cam.scales": (1.0,)})
  assert infer_cam.run(other, copy)["make_cam"]["written"] == len(before) // 2
  with open(paths.cam_protocol(copy)) as f:
    assert json.load(f)["scales"] == [1.0]


def test_cpal_batch_shift_records_the_batch_size():
  base = tiny_config(**{"method.name": "cpal"})
  assert "batch_size" not in infer_cam.protocol(base, 1)
  batch = tiny_config(**{"method.name": "cpal", "method.cpal.infer_shift": "batch", "cam.batch_size": 3})
  assert infer_cam.protocol(batch, 1)["batch_size"] == 3


@pytest.mark.slow
def test_plain_cam_maps_have_no_background_and_are_swept(tmp_path):
  config = tiny_config(**{"method.name": "cam", "train.num_steps": 2, "cam.scales": (1.0,)})
  summary = cli.run(config, str(tmp_path))
  from cpal_jax.data import pipeline

  el = pipeline.make_source(config, config.data.train_split)[0]
  m = infer_cam.load_maps(paths.cam_map(str(tmp_path), el["id"]))
  np.testing.assert_array_equal(m["keys"], np.flatnonzero(el["label"]) + 1)
  assert summary["thresholds"]["seed"] is not None and len(summary["seed_sweep"]) == 60


def test_bank_refresh_rebuilds_banks_and_centres_from_the_final_weights():
  """refresh_bank: the banks hold Eq. 4's prototypes of every training image in order (computed
  here image by image, in numpy, from the network's outputs), the oldest dropped past capacity, and
  the centres and mu_c are k-means of those banks."""
  import jax

  from cpal_jax.data import pipeline
  from cpal_jax.method import bank as bank_lib
  from cpal_jax.method import cpal
  from cpal_jax.parallel import sharding
  from cpal_jax.train import cam as cam_stage
  from cpal_jax.train import state as state_lib
  from test_train import cpal_config

  # The thresholded Eq. 4 mask keeps the reference short; the refresh is the same for every mask.
  config = cpal_config(
      **{"data.num_train": 24, "method.cpal.capacity": 6, "method.cpal.tau": 0.3, "method.cpal.mask_mode": "thresh"}
  )
  mesh = sharding.make_mesh(1)
  setup = cam_stage.build(config, mesh, config.data.num_train)
  state = setup.init_state()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  got = infer_cam.refresh_bank(config, setup.model, variables, state.extra, mesh)

  source = pipeline.make_source(config, config.data.train_split)
  k, tau = config.data.num_classes - 1, config.method.cpal.tau
  banks = [[] for _ in range(k)]
  for i in range(len(source)):
    el = source[i]
    x = state_lib.normalize_images(jnp.asarray(el["image"][None]), jnp.ones((1, 64, 64)))
    out = jax.tree.map(np.asarray, setup.model.apply(variables, x))
    cam, feats = np.maximum(out["cam"][0], 0), out["hie"][0]
    norm = cam / (cam.reshape(-1, k).max(0) + 1e-5)
    for n in np.flatnonzero(el["label"]):
      m = norm[..., n] > tau
      if m.any():
        banks[n].append(feats[m].mean(0))
  cap = config.method.cpal.capacity
  count = np.asarray(got.bank.count)[:k]
  np.testing.assert_array_equal(count, [min(len(b), cap) for b in banks])
  assert count.min() > 0 and max(len(b) for b in banks) > cap  # the FIFO wrapped somewhere
  for n in range(k):
    kept = np.stack(banks[n][-cap:])
    stored = np.asarray(got.bank.feats)[n, : count[n]]
    # Ring order: sorting the rows makes the comparison independent of the write pointer.
    np.testing.assert_allclose(np.sort(stored, 0), np.sort(kept, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.bank_mean)[n], kept.mean(0), rtol=1e-4, atol=1e-5)
  want = cpal.recluster(got.replace(ready=jnp.zeros_like(got.ready)), jax.random.key(config.seed + 3), config.method.cpal)
  np.testing.assert_allclose(np.asarray(got.centers), np.asarray(want.centers), rtol=1e-5, atol=1e-6)
  assert np.asarray(got.ready)[:k].all()
  assert bank_lib.mean(got.bank).shape == got.bank_mean.shape


@pytest.mark.parametrize("scale_norm", ["per_scale", "once"])
def test_sipe_read_with_fused_features_and_scale_norm(scale_norm):
  """SIPE's inference: the network outputs of an image and its flip fused before the seeds,
  prototypes and IS-CAM are computed once; scale_norm=once returns that IS-CAM unnormalised (the
  scales are summed and normalised once, later), per_scale max-normalises each scale's map."""
  import jax

  from cpal_jax.method import sipe
  from cpal_jax.models import cam_net
  from cpal_jax.train import state as state_lib

  config = tiny_config(**{"method.name": "sipe", "cam.flip_fusion": "features", "cam.scale_norm": scale_norm})
  model = cam_net.from_config(config)
  rng = np.random.default_rng(3)
  batch = {
      "image": rng.integers(0, 256, (2, 64, 64, 3)).astype(np.uint8),
      "valid": np.ones((2, 64, 64), np.uint8),
      "label": np.array([[1, 0, 1, 0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0, 0, 0]], np.float32),
  }
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  got = np.asarray(infer_cam.make_predict(model, config)(variables, {}, batch))

  x = state_lib.normalize_images(jnp.asarray(batch["image"]), jnp.asarray(batch["valid"]))
  a, b = model.apply(variables, x), model.apply(variables, x[:, :, ::-1])
  fused = {k: (a[k] + b[k][:, :, ::-1]) / 2 for k in ("cam", "hie")}
  mask = sipe.label_mask(jnp.ones(fused["cam"].shape[:3]), jnp.asarray(batch["label"]))
  is_cam = sipe.sipe_maps(fused["cam"], fused["hie"], fused["hie"], mask, mask_cam=False)["is_cam"] * mask
  want = 2 * (sipe.max_normalize(is_cam) if scale_norm == "per_scale" else is_cam)
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5)
  assert (got.max() > 2.0 - 1e-3) == (scale_norm == "per_scale")


def test_exact_size_read_is_padding_free(sipe_run, tmp_path):
  """cam.pad_multiple=0 reads each image alone at its exact size: the same maps as a padding that
  happens to be exact (64 px images at scales 1/0.5/1.5 with multiple 16), and not those of a
  padding that adds cells (multiple 64 pads the 32 and 96 px scales)."""
  import shutil

  config, workdir, _ = sipe_run

  def read(multiple):
    run_dir = tmp_path / f"pad{multiple}"
    shutil.copytree(os.path.join(workdir, "cam", "ckpt"), run_dir / "cam" / "ckpt")
    cfg = tiny_config(**{"train.num_steps": 2, "cam.scales": (1.0, 0.5, 1.5), "cam.pad_multiple": multiple})
    cfg.data.num_train = 10
    cfg.stages = "make_cam"
    cli.run(cfg, str(run_dir))
    return {f: infer_cam.load_maps(str(run_dir / "cam" / "maps" / f))["high_res"]
            for f in sorted(os.listdir(run_dir / "cam" / "maps"))}

  exact, sixteen, sixty_four = read(0), read(16), read(64)
  assert exact.keys() == sixteen.keys() and len(exact) == 10
  for f in exact:
    np.testing.assert_allclose(exact[f], sixteen[f], atol=2e-3)  # float16 files
  assert max(np.abs(exact[f] - sixty_four[f]).max() for f in exact) > 1e-2


def test_pixel_cap_splits_calls_without_changing_the_maps(sipe_run, tmp_path):
  """cam.max_batch_pixels small enough for one image per call reads the same maps as whole steps
  (each call is padded to its step's size), and the cap gives way to devices and to CPAL's batch
  shift."""
  import shutil

  config, workdir, _ = sipe_run
  assert infer_cam.call_batch(config, 8, 64 * 64, 1) == min(8, config.cam.max_batch_pixels // 4096)
  tight = tiny_config(**{"cam.max_batch_pixels": 96 * 96})
  assert infer_cam.call_batch(tight, 8, 96 * 96, 1) == 1
  assert infer_cam.call_batch(tight, 8, 96 * 96, 2) == 2  # at least one image per device
  assert infer_cam.call_batch(tiny_config(**{"cam.max_batch_pixels": 0}), 8, 10**9, 1) == 8
  shift = tiny_config(
      **{"cam.max_batch_pixels": 1, "method.name": "cpal", "method.cpal.infer_shift": "batch"}
  )
  assert infer_cam.call_batch(shift, 8, 96 * 96, 1) == 8

  def read(cap):
    run_dir = tmp_path / f"cap{cap}"
    shutil.copytree(os.path.join(workdir, "cam", "ckpt"), run_dir / "cam" / "ckpt")
    cfg = tiny_config(**{"train.num_steps": 2, "cam.scales": (1.0, 0.5, 1.5), "cam.max_batch_pixels": cap})
    cfg.data.num_train = 6
    cfg.stages = "make_cam"
    cli.run(cfg, str(run_dir))
    return {f: infer_cam.load_maps(str(run_dir / "cam" / "maps" / f))["high_res"]
            for f in sorted(os.listdir(run_dir / "cam" / "maps"))}

  whole, one_by_one = read(0), read(1)
  assert whole.keys() == one_by_one.keys() and len(whole) == 6
  for f in whole:
    np.testing.assert_allclose(whole[f], one_by_one[f], atol=2e-3)  # float16 files
