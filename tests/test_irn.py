"""IRN's boundary network: the model against a PyTorch transcription of IRN's edge branch, frozen
backbone, training on synthetic IR labels (loss falls, resume = straight run, 8 devices = 1), the
missing-label error, and the edge maps of load_edge_fn."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.experimental.compilation_cache import compilation_cache

import synthetic as synthetic_config
from cpal_jax import checkpointing, paths
from cpal_jax.data import palette, pipeline
from cpal_jax.models import irn as irn_model
from cpal_jax.models import resnet
from cpal_jax.parallel import sharding
from cpal_jax.refine import affinity
from cpal_jax.refine import irn as edges
from cpal_jax.train import irn
from cpal_jax.train import state as state_lib
from test_train import tree_state

STEPS = 8


def tiny_config(**overrides):
  c = synthetic_config.get_config()
  c.data.image_size = 64
  c.data.num_train = 32
  c.refine.irn.crop_size = 64
  c.refine.irn.batch_size = 8
  c.refine.irn.num_steps = STEPS
  c.refine.irn.radius = 3  # few directions: the loss and its gradient compile fast
  c.refine.irn.momentum = 0.9  # eight steps must show learning (0.676 -> 0.643)
  c.refine.irn.log_every = 2
  c.refine.irn.ckpt_every = 2
  c.refine.irn.pad_multiple = 32
  c.train.ckpt_keep = STEPS  # every checkpoint of the straight run stays, for the 8-device test
  c.mesh.data = 1
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def write_ir_labels(config, workdir: str) -> list[str]:
  """IR labels made from the synthetic ground truth, with a fifth of the pixels unsure."""
  source = pipeline.make_source(config, config.data.train_split, with_mask=True)
  out = paths.ir_labels(workdir)
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(len(source)):
    el = source[i]
    label = el["mask"].copy()
    label[rng.random(label.shape) < 0.2] = 255
    palette.save_label_png(os.path.join(out, f"{el['id']}.png"), label)
  return source.ids()


def restore_state(config, workdir: str, step: int | None = None):
  setup = irn.build(config, sharding.make_mesh(config.mesh.data), STEPS)
  ckpt = checkpointing.Checkpointer(paths.irn_ckpt(workdir), async_save=False)
  step = step or ckpt.latest_step()
  state, _ = ckpt.restore(step, setup.abstract_state)
  ckpt.close()
  return step, jax.tree.map(np.asarray, state)


@pytest.fixture(scope="module", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
  """irn.train() builds and compiles its step on every call, as a fresh process would; the resume
  test calls it three times with one config, so the repeats load the program from disk. XLA's
  optimisations are off: on these tiny models compiling costs far more than running."""
  settings = {
      "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
      "jax_persistent_cache_min_compile_time_secs": 0.0,
      "jax_persistent_cache_min_entry_size_bytes": 0,
      "jax_disable_most_optimizations": True,  # tiny models: compile time dominates
  }
  old = {k: jax.config.values[k] for k in settings}
  for k, v in settings.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()  # jax decides once per process whether to use the cache
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("irn_straight"))
  config = tiny_config()
  write_ir_labels(config, workdir)
  summary = irn.train(config, workdir)
  return config, workdir, summary


# ------------------------------------------------------------------------------------------ model
def test_resnet50_edge_map_is_stride_4():
  model = irn_model.EdgeNet("resnet50", (2, 2, 2, 1))
  for h, w in ((512, 512), (375, 500)):
    x = jnp.zeros((1, h, w, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(model.apply, variables, x).shape == (1, -(-h // 4), -(-w // 4))
  heads = {k: v for k, v in variables["params"].items() if k != "backbone"}
  assert sorted(heads) == list(irn_model.HEAD_MODULES)
  # IRN's fc_edge1..5 read 64, 256, 512, 1024, 2048 channels.
  assert [heads[f"fc_edge{i}"]["conv"]["kernel"].shape[2] for i in range(1, 6)] == [64, 256, 512, 1024, 2048]
  assert heads["fc_edge6"]["kernel"].shape == (1, 1, 160, 1)


def test_heads_match_pytorch_irn_edge_branch():
  """IRN's fc_edge1..6 (conv, GroupNorm(4, 32), nn.Upsample(scale_factor), ReLU, crop, concat) in
  PyTorch on our backbone's features, at an odd size where the crops matter."""
  torch = pytest.importorskip("torch")
  tnn = torch.nn
  model = irn_model.EdgeNet("resnet_tiny", (2, 2, 2, 1))
  x = jax.random.normal(jax.random.key(0), (2, 93, 77, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  # Non-trivial GroupNorm affine parameters, so their layout is checked too.
  flat = traverse_util.flatten_dict(variables["params"])
  keys = jax.random.split(jax.random.key(2), len(flat))
  flat = {
      k: v + 0.3 * jax.random.normal(kk, v.shape) if k[-2] == "gn" else v
      for (k, v), kk in zip(flat.items(), keys)
  }
  variables = {**variables, "params": traverse_util.unflatten_dict(flat)}
  out = np.asarray(jax.jit(model.apply)(variables, x))
  backbone = {"params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]["backbone"]}
  feats = jax.jit(resnet.ResNet("resnet_tiny", (2, 2, 2, 1)).apply)(backbone, x)
  p = variables["params"]
  t = lambda a: torch.from_numpy(np.array(a))
  with torch.no_grad():
    edges = []
    for i, scale in enumerate((1, 1, 2, 4, 4)):
      head = p[f"fc_edge{i + 1}"]
      conv = tnn.Conv2d(head["conv"]["kernel"].shape[2], 32, 1, bias=False)
      conv.weight.copy_(t(head["conv"]["kernel"]).permute(3, 2, 0, 1))
      gn = tnn.GroupNorm(4, 32)
      gn.weight.copy_(t(head["gn"]["scale"]))
      gn.bias.copy_(t(head["gn"]["bias"]))
      layers = [conv, gn]
      if scale > 1:
        layers.append(tnn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False))
      seq = tnn.Sequential(*layers, tnn.ReLU())
      edges.append(seq(t(feats[f"stage{i}"]).permute(0, 3, 1, 2)))
    h, w = edges[1].shape[2:]
    fc6 = tnn.Conv2d(160, 1, 1, bias=True)
    fc6.weight.copy_(t(p["fc_edge6"]["kernel"]).permute(3, 2, 0, 1))
    fc6.bias.copy_(t(p["fc_edge6"]["bias"]))
    ref = fc6(torch.cat([e[..., :h, :w] for e in edges], 1))[:, 0].numpy()
  assert out.shape == ref.shape == (2, 24, 20)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_only_the_heads_get_gradients():
  model = irn_model.EdgeNet("resnet_tiny", (2, 2, 2, 1))
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  loss = lambda params: jnp.sum(jnp.sin(model.apply({**variables, "params": params}, x)))
  grads = jax.jit(jax.grad(loss))(variables["params"])
  backbone = traverse_util.flatten_dict(grads["backbone"])
  assert backbone and all(float(jnp.abs(g).sum()) == 0.0 for g in backbone.values())
  for name in irn_model.HEAD_MODULES:
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads[name]))) > 0.0, name


# --------------------------------------------------------------------------------------- training
def test_augment_gives_stride_4_labels_and_pads_with_ignore():
  aug = irn.IRNAugment(64, (0.5, 1.5))
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
  label = np.full((40, 50), 3, np.uint8)
  for seed in range(5):
    out = aug.random_map({"image": image, "ir_label": label}, np.random.default_rng(seed))
    assert out["image"].shape == (64, 64, 3) and out["valid"].shape == (64, 64)
    assert out["ir_label"].shape == (16, 16)
    assert set(np.unique(out["ir_label"])) <= {3, 255}
    # The image is at most 60 px (x1.5) in a 64 crop: some padding always shows.
    assert (out["ir_label"] == 255).any() and not out["valid"].all()
  with pytest.raises(ValueError, match="multiple of 4"):
    irn.IRNAugment(66, (0.5, 1.5))


def _loss_fn(config):
  model, irn_cfg = irn_model.from_config(config), config.refine.irn

  def loss(variables, batch):
    logits = model.apply(variables, state_lib.normalize_images(batch["image"], batch["valid"]))
    return affinity.affinity_loss(logits, batch["ir_label"], irn_cfg.radius, irn_window=irn_cfg.irn_window)[0]

  return jax.jit(loss)


def test_training_reduces_the_loss(straight):
  config, workdir, summary = straight
  assert summary["irn"]["steps"] == STEPS and summary["irn"]["images"] == config.data.num_train
  assert np.isfinite(summary["irn"]["final_loss"])
  source = irn.IRLabelSource(
      pipeline.make_source(config, config.data.train_split),
      paths.ir_labels(workdir),
      config.data.num_classes,
  )
  schedule = irn.make_schedule(config, len(source))
  data_iter = irn.train_iterator(config, source, schedule)
  batch = next(data_iter)
  data_iter.close()
  fresh = irn.build(config, sharding.make_mesh(1), STEPS).init_state()
  _, trained = restore_state(config, workdir)
  loss = _loss_fn(config)
  before = float(loss({"params": fresh.params, "batch_stats": fresh.batch_stats}, batch))
  after = float(loss({"params": trained.params, "batch_stats": trained.batch_stats}, batch))
  assert after < before - 0.015, (before, after)
  # The frozen backbone is bit-identical to its initialisation.
  jax.tree.map(
      np.testing.assert_array_equal, jax.device_get(fresh.params["backbone"]), trained.params["backbone"]
  )


def test_resume_equals_straight_run(straight, tmp_path):
  config, workdir, _ = straight
  resumed = str(tmp_path)
  write_ir_labels(config, resumed)
  irn.train(tiny_config(**{"refine.irn.stop_at_step": 3}), resumed)
  assert restore_state(config, resumed)[0] == 3
  irn.train(config, resumed)  # the same command again picks up at step 3
  s1, a = restore_state(config, resumed)
  s2, b = restore_state(config, workdir)
  assert s1 == s2 == STEPS
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)


def test_eight_devices_match_one(straight, tmp_path):
  """The global-batch loss does not depend on the device count (IRN trains on one GPU)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 fake CPU devices (conftest)")
  config, workdir, _ = straight
  eight = tiny_config(**{"mesh.data": 8, "refine.irn.stop_at_step": 2})
  write_ir_labels(eight, str(tmp_path))
  irn.train(eight, str(tmp_path))
  _, a = restore_state(eight, str(tmp_path))
  _, b = restore_state(config, workdir, step=2)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a.params, b.params)


def test_missing_ir_label_names_the_file(tmp_path):
  config = tiny_config()
  ids = write_ir_labels(config, str(tmp_path))
  missing = os.path.join(paths.ir_labels(str(tmp_path)), f"{ids[5]}.png")
  os.remove(missing)
  with pytest.raises(FileNotFoundError, match="refine") as err:
    irn.train(config, str(tmp_path))
  assert missing in str(err.value)


def test_changed_backbone_is_refused_on_resume(straight, tmp_path):
  _, shared, _ = straight
  shared_before = tree_state(shared)
  workdir = str(tmp_path / "w")
  shutil.copytree(shared, workdir)  # a refused resume must not touch the module's run either way
  with pytest.raises(ValueError, match="refine.irn.backbone"):
    irn.train(tiny_config(**{"refine.irn.backbone": "resnet_small"}), workdir)
  assert tree_state(shared) == shared_before


# -------------------------------------------------------------------------------------- inference
def test_edge_maps_shapes_flip_symmetry_and_batches(straight):
  config, workdir, _ = straight
  edge_fn = edges.load_edge_fn(config, workdir, batch_size=2)
  rng = np.random.default_rng(0)
  # Both sizes fall in the 64x64 bucket (pad_multiple 32): one compile per batch size.
  a = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
  b = rng.integers(0, 255, (50, 62, 3), dtype=np.uint8)
  ea, eb = edge_fn(a), edge_fn(b)
  assert ea.shape == (16, 16) and eb.shape == (13, 16)
  assert ea.dtype == np.float32 and 0 <= ea.min() and ea.max() <= 1
  # A mirror-symmetric image (width a multiple of 4) has a mirror-symmetric edge map.
  half = rng.integers(0, 255, (48, 20, 3), dtype=np.uint8)
  sym = np.concatenate([half, half[:, ::-1]], axis=1)
  es = edge_fn(sym)
  np.testing.assert_allclose(es, es[:, ::-1], atol=1e-6)
  # The batched variant (buckets, a padded last batch) gives the per-image maps.
  maps = edge_fn.batch([a, b, sym])
  for m, ref in zip(maps, (ea, eb, es)):
    np.testing.assert_allclose(m, ref, atol=1e-5)


class _RampNet:
  """A stand-in boundary network (anything with Flax's apply): stride-4 logits = scale x the mean
  of the first normalised channel over each 4x4 block + a left-to-right ramp, so an image and its
  flip give logits that differ after flipping back, by up to +-6."""

  def apply(self, variables, x):
    b, h, w, _ = x.shape
    blocks = x[..., 0].reshape(b, h // 4, 4, w // 4, 4).mean(axis=(2, 4))
    return variables["scale"] * blocks + jnp.linspace(-3.0, 3.0, w // 4)[None, None, :]


def test_edge_map_is_the_sigmoid_of_the_mean_logits():
  """IRN's EdgeDisplacement: sigmoid((logits(x) + flip(logits(flip x))) / 2), not the mean of the
  two sigmoids, each image padded bottom/right to the bucket and cropped to ceil(H/4) x ceil(W/4)."""
  net, variables, pad = _RampNet(), {"scale": 4.0}, 32
  predictor = edges.EdgePredictor(net, variables, pad)
  rng = np.random.default_rng(3)
  image = rng.integers(0, 255, (50, 62, 3), dtype=np.uint8)
  h, w = image.shape[:2]
  hp, wp, fh, fw = 64, 64, 13, 16

  def logits(im):  # one image alone, padded as the predictor pads it
    u8 = np.zeros((1, hp, wp, 3), np.uint8)
    u8[0, :h, :w] = im
    valid = np.zeros((1, hp, wp), np.uint8)
    valid[0, :h, :w] = 1
    return np.asarray(net.apply(variables, state_lib.normalize_images(u8, valid)), np.float64)[0, :fh, :fw]

  a, b = logits(image), logits(image[:, ::-1])[:, ::-1]
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
  want = sigmoid((a + b) / 2)
  got = predictor(image)
  assert got.shape == (fh, fw) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(predictor.batch([image, image[:20]])[0], want, rtol=0, atol=1e-6)
  # The case tells the two averages apart.
  assert np.abs((sigmoid(a) + sigmoid(b)) / 2 - want).max() > 0.05


def test_edge_fn_without_checkpoint_says_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="refine"):
    edges.load_edge_fn(tiny_config(), str(tmp_path))
