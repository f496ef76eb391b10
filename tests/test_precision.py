"""model.compute_dtype=bfloat16: the backbone's convolutions run in bfloat16 on float32 parameters,
BatchNorm statistics stay float32, and everything the model hands out (CAM, score, x4, F_hie, the
projection; DeepLab's logits) is float32, so the losses, CPAL's bank and k-means never see
bfloat16. Checked on the lowered StableHLO (which convolutions are bfloat16), against the float32
model (loose tolerance) and through one jitted CPAL train step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cpal_jax.data import pipeline
from cpal_jax.models import cam_net, deeplab, resnet
from cpal_jax.parallel import sharding
from cpal_jax.train import cam as cam_stage
from test_train import cpal_config, tiny_config

# Operand and result types of one stablehlo.convolution line: (tensor<..xT>, tensor<..xT>) -> tensor<..xT>
_CONV_TYPES = re.compile(
    r"stablehlo\.convolution.*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>"
)
# A 1x1 convolution (resnet.Conv1x1): NHWC features contracted over channels with an [in, out] kernel.
_CONV1X1_TYPES = re.compile(
    r"stablehlo\.dot_general .*contracting_dims = \[3\] x \[0\].*"
    r": \(tensor<\d+x\d+x\d+x\d+x(\w+)>, tensor<\d+x\d+x(\w+)>\) -> tensor<[^>]*x(\w+)>"
)


# Any convolution or matmul, forward or gradient.
_CONTRACTION_TYPES = re.compile(
    r"stablehlo\.(?:convolution|dot_general).*"
    r": \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>"
)


def conv_dtypes(fn, *args) -> list:
  """(input, kernel, output) element types of every convolution in fn's lowered StableHLO, 1x1 ones
  (matmuls over channels) included."""
  text = jax.jit(fn).lower(*args).as_text()
  return [t for line in text.splitlines() for t in _CONV_TYPES.findall(line) + _CONV1X1_TYPES.findall(line)]


def kernels(params, under: str | None = None) -> int:
  flat = traverse_util.flatten_dict(params)
  return sum(1 for k in flat if k[-1] == "kernel" and (under is None or k[0] == under))


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


def leaf_dtypes(tree) -> set:
  return {np.dtype(x.dtype) for x in jax.tree.leaves(tree)}


pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_compute_dtype_names():
  assert resnet.compute_dtype("float32") == jnp.float32
  assert resnet.compute_dtype("bfloat16") == jnp.bfloat16
  with pytest.raises(ValueError, match="model.compute_dtype='float16'"):
    cam_net.from_config(tiny_config(**{"model.compute_dtype": "float16"}))
  config = tiny_config()
  config.seg.compute_dtype = "fp16"
  with pytest.raises(ValueError, match="seg.compute_dtype='fp16'"):
    deeplab.from_config(config)


@pytest.fixture(scope="module")
def cam_models():
  """float32 and bfloat16 CAM nets of one config (CPAL's conv256 head, batch-statistics BatchNorm so
  the training-mode statistics can be checked), their shared variables and a batch."""
  overrides = {"method.name": "cpal", "method.cpal.proj_head": "conv256", "model.batch_norm": "train"}
  models = {
      name: cam_net.from_config(tiny_config(**overrides, **{"model.compute_dtype": name}))
      for name in ("float32", "bfloat16")
  }
  assert models["bfloat16"].dtype == jnp.bfloat16 and models["float32"].dtype == jnp.float32
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3), jnp.float32)
  variables = jax.jit(models["float32"].init)(jax.random.key(0), x)
  return models, variables, x


def test_bf16_variables_are_float32(cam_models):
  models, variables, x = cam_models
  bf16_vars = jax.eval_shape(models["bfloat16"].init, jax.random.key(0), x)
  assert leaf_dtypes(bf16_vars) == {np.dtype(np.float32)}
  same = lambda a, b: a.shape == b.shape and a.dtype == b.dtype  # noqa: E731
  assert jax.tree.all(jax.tree.map(same, bf16_vars, variables))  # a float32 checkpoint loads as is


def test_bf16_backbone_convolutions_heads_float32(cam_models):
  models, variables, x = cam_models
  n_backbone = kernels(variables["params"], "backbone")
  n_heads = kernels(variables["params"]) - n_backbone
  assert n_backbone == 17 and n_heads == 6  # resnet_tiny; classifier, 4 side heads, proj
  apply = lambda m: lambda v, x: m.apply(v, x)  # noqa: E731
  f32 = conv_dtypes(apply(models["float32"]), variables, x)
  assert f32 == [("f32", "f32", "f32")] * (n_backbone + n_heads)
  bf16 = conv_dtypes(apply(models["bfloat16"]), variables, x)
  assert bf16.count(("bf16", "bf16", "bf16")) == n_backbone
  assert bf16.count(("f32", "f32", "f32")) == n_heads
  assert len(bf16) == n_backbone + n_heads


def test_bf16_outputs_float32_and_close(cam_models):
  models, variables, x = cam_models
  want = jax.jit(models["float32"].apply)(variables, x)
  got = jax.jit(models["bfloat16"].apply)(variables, x)
  assert set(got) == {"cam", "score", "x4", "hie", "proj"}
  for k, v in got.items():
    assert v.dtype == jnp.float32, k
    assert np.isfinite(np.asarray(v)).all(), k
    assert rel_err(v, want[k]) < 5e-2, (k, rel_err(v, want[k]))
  # bfloat16 really ran: not bit-identical to float32.
  assert rel_err(got["cam"], want["cam"]) > 0


def test_bf16_batch_statistics_float32(cam_models):
  models, variables, x = cam_models

  def train_apply(model):
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))

  want_out, want_vars = train_apply(models["float32"])(variables, x)
  got_out, got_vars = train_apply(models["bfloat16"])(variables, x)
  assert leaf_dtypes(got_vars["batch_stats"]) == {np.dtype(np.float32)}
  assert {v.dtype for v in got_out.values()} == {jnp.dtype(jnp.float32)}
  for path, v in traverse_util.flatten_dict(got_vars["batch_stats"]).items():
    w = traverse_util.flatten_dict(want_vars["batch_stats"])[path]
    np.testing.assert_allclose(v, w, rtol=5e-2, atol=5e-2, err_msg=str(path))
  assert rel_err(got_out["cam"], want_out["cam"]) < 5e-2


def test_deeplab_bf16_backbone_float32_logits():
  f32 = deeplab.DeepLabV2(5, "resnet_tiny", "caffe")
  bf16 = deeplab.DeepLabV2(5, "resnet_tiny", "caffe", dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(2), (1, 32, 32, 3), jnp.float32)
  variables = jax.jit(f32.init)(jax.random.key(0), x)
  assert leaf_dtypes(jax.eval_shape(bf16.init, jax.random.key(0), x)) == {np.dtype(np.float32)}
  convs = conv_dtypes(lambda v, x: bf16.apply(v, x), variables, x)
  assert convs.count(("bf16", "bf16", "bf16")) == kernels(variables["params"], "backbone")
  assert convs.count(("f32", "f32", "f32")) == 4  # the ASPP branches
  got, want = jax.jit(bf16.apply)(variables, x), jax.jit(f32.apply)(variables, x)
  assert got.dtype == jnp.float32
  assert rel_err(got, want) < 5e-2


def test_bf16_cpal_train_step_keeps_bank_and_losses_float32():
  """Real batches through the jitted CPAL step: the banks fill, k-means builds context prototypes,
  and a step with L_self live still leaves every float of the state float32 and finite."""
  config = cpal_config(**{"model.compute_dtype": "bfloat16"})
  mesh = sharding.make_mesh(1)
  source = pipeline.make_source(config, config.data.train_split)
  setup = cam_stage.build(config, mesh, len(source))
  assert setup.model.dtype == jnp.bfloat16
  data = pipeline.train_iterator(config, source, setup.schedule)
  state = setup.init_state()
  batch = sharding.global_batch(next(data), mesh)
  key = jax.random.key(0)
  convs = _CONTRACTION_TYPES.findall(setup.step_fn.lower(state, batch, key).as_text())
  n_backbone = kernels(state.params, "backbone")
  # The forward backbone, and the backward of the stages that train (detach_after=2), in bfloat16;
  # nothing mixes bfloat16 with float32.
  assert convs.count(("bf16", "bf16", "bf16")) > n_backbone
  assert {c for c in convs if "bf16" in c} == {("bf16", "bf16", "bf16")}

  metrics = []
  for step in range(3):
    if step == 2:
      state = state.replace(extra=setup.recluster(state.extra, jax.random.key(1)))
      batch = sharding.global_batch(next(data), mesh)
    state, m = setup.step_fn(state, batch, key)
    metrics.append(jax.device_get(m))
  state = jax.device_get(state)

  for m in metrics:
    for k, v in m.items():
      assert v.dtype == np.float32 and np.isfinite(v), (k, v)
  assert metrics[-1]["loss/self"] > 0  # PACAM and L_self ran on the bfloat16 features
  floats = [x for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating)]
  assert {x.dtype for x in floats} == {np.dtype(np.float32)}
  assert all(np.isfinite(x).all() for x in floats)
  extra = state.extra
  assert extra.bank.feats.dtype == extra.centers.dtype == extra.bank_mean.dtype == np.float32
  assert int(extra.bank.count[:9].max()) > 0 and bool(extra.ready.any())
