import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from cpal_jax.models import cam_net, resnet


def _shapes(arch, size, **kw):
  model = resnet.ResNet(arch, **kw)
  x = jnp.zeros((1, size, size, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  return variables, {k: v.shape for k, v in out.items()}


def test_resnet50_os16_shapes_and_channels():
  variables, shapes = _shapes("resnet50", 512)
  assert shapes == {
      "stage0": (1, 128, 128, 64),
      "stage1": (1, 128, 128, 256),
      "stage2": (1, 64, 64, 512),
      "stage3": (1, 32, 32, 1024),
      "stage4": (1, 32, 32, 2048),
  }
  flat = traverse_util.flatten_dict(variables["params"])
  kernels = [k for k in flat if k[-1] == "kernel"]
  # torchvision resnet50 has 53 convolutions (stem + 16 blocks x 3 + 4 downsamples), excluding fc.
  assert len(kernels) == 53
  assert sum(v.size for v in flat.values()) == 23_508_032  # torchvision resnet50 minus fc, BN affine included
  assert flat[("layer1_0", "downsample_conv", "kernel")].shape == (1, 1, 64, 256)
  assert flat[("layer4_2", "conv3", "kernel")].shape == (1, 1, 512, 2048)
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  assert len(stats) == 2 * 53


def test_output_stride_8_and_odd_sizes_match_pytorch_arithmetic():
  _, shapes = _shapes("resnet_tiny", 321, strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4))
  # torch: conv 7x7/2 p3 -> 161, maxpool 3/2 p1 -> 81, layer2 /2 -> 41, then stride 1.
  assert shapes["stage0"][1:3] == (81, 81)
  assert shapes["stage2"][1:3] == (41, 41) and shapes["stage4"][1:3] == (41, 41)


def test_resnet101_block_count():
  variables, _ = _shapes("resnet101", 64)
  names = {k[0] for k in traverse_util.flatten_dict(variables["params"])}
  assert sum(n.startswith("layer3_") for n in names) == 23


def test_caffe_layout_moves_the_stride():
  model = resnet.Bottleneck(16, stride=2, downsample=True, stride_on_1x1=True)
  x = jnp.ones((1, 8, 8, 64))
  v = jax.eval_shape(model.init, jax.random.key(0), x)
  inter = jax.eval_shape(
      lambda v: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]), v
  )
  assert inter[1]["intermediates"]["conv1"]["__call__"][0].shape == (1, 4, 4, 16)


def test_frozen_bn_uses_running_stats():
  model = resnet.ResNet("resnet_tiny")
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  v = jax.jit(model.init)(jax.random.key(0), x)
  apply = jax.jit(lambda v, x: model.apply(v, x)["stage4"])
  out1 = apply(v, x)
  out2 = apply(v, x[:1])  # batch statistics would differ with another batch
  assert jnp.allclose(out1[:1], out2, atol=1e-5)


def test_stop_gradient_after_stage2():
  model = resnet.ResNet("resnet_tiny", detach_after=2)
  x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
  v = jax.jit(model.init)(jax.random.key(0), x)
  g = jax.jit(jax.grad(lambda p: model.apply({**v, "params": p}, x)["stage4"].sum()))(v["params"])
  assert float(jnp.abs(g["layer2_0"]["conv1"]["kernel"]).sum()) == 0.0
  assert float(jnp.abs(g["conv1"]["kernel"]).sum()) == 0.0
  assert float(jnp.abs(g["layer3_0"]["conv1"]["kernel"]).sum()) > 0.0


def test_cam_net_outputs_and_side_dims():
  model = cam_net.CAMNet(num_classes=21, backbone="resnet50")
  x = jnp.zeros((2, 320, 320, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert out["cam"].shape == (2, 20, 20, 20) and out["score"].shape == (2, 20)
  assert out["hie"].shape == (2, 20, 20, 768) and out["x4"].shape == (2, 20, 20, 2048)
  assert cam_net.scaled_side_dims("resnet50") == (128, 128, 256, 256)


def test_unknown_backbone_is_a_clear_error():
  with pytest.raises(ValueError, match="model.backbone"):
    _shapes("resnet7", 64)


def test_cam_net_dilations_keep_the_parameters_and_dilate_the_stages():
  """model.dilations: a backbone pretrained with layer3/4 strided keeps its receptive fields at
  output stride 8 when they are dilated; the parameters (what pretrained weights fill) are the
  same, and a resumed run with other dilations is refused (checkpoint fingerprint)."""
  import synthetic as synthetic_config

  from cpal_jax.train import cam as cam_stage

  c = synthetic_config.get_config()
  x = jnp.zeros((1, 64, 64, 3))
  plain = cam_net.from_config(c)
  with c.unlocked():
    c.model.dilations = (1, 1, 2, 4)
  dilated = cam_net.from_config(c)
  shapes = lambda m: jax.tree.map(lambda a: a.shape, jax.eval_shape(m.init, jax.random.key(0), x))
  assert shapes(plain) == shapes(dilated)
  jaxpr = str(jax.make_jaxpr(lambda v: dilated.apply(v, x))(dilated.init(jax.random.key(0), x)))
  assert "rhs_dilation=(4, 4)" in jaxpr and "rhs_dilation=(2, 2)" in jaxpr
  assert cam_stage.fingerprint(c, 1)["model.dilations"] == [1, 1, 2, 4]
  assert cam_stage.fingerprint(synthetic_config.get_config(), 1)["model.dilations"] is None
