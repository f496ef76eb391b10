"""The weight converter (python -m cpal_jax.convert_weights): a random torchvision-named ResNet-50
saved as .pth and .safetensors converts to our tree and gives PyTorch's activations stage by stage;
kazuto1011's caffe names convert to the same tree; the command line; and the refusals (pickled
objects, other architectures, missing tensors, wrong shapes or extensions, an existing output)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from cpal_jax import convert_weights as cw
from cpal_jax.models import cam_net, pretrained, resnet
from test_seg import _kazuto_names

REPO = Path(__file__).resolve().parents[1]
CAM_STRIDES = (2, 2, 2, 1)  # the CAM net's (and IRN's) conv1, layer2, layer3, layer4 strides


# ------------------------------------------------------------------- torchvision-named reference
class _Bottleneck(torch.nn.Module):

  def __init__(self, cin, planes, stride):
    super().__init__()
    nn = torch.nn
    self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
    self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
    self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride != 1 or cin != planes * 4:
      self.downsample = nn.Sequential(
          nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _BasicBlock(torch.nn.Module):
  """ResNet-18/34's block, to build a checkpoint of another architecture."""

  def __init__(self, cin, planes, stride):
    super().__init__()
    nn = torch.nn
    self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
    self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
    if stride != 1 or cin != planes:
      self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class TorchResNet(torch.nn.Module):
  """torchvision's ResNet names (conv1, bn1, layer1.0.conv1, layer1.0.downsample.0, ..., fc); the
  forward returns the stem (after the max-pool) and the four stages, like our ResNet."""

  def __init__(self, blocks=(3, 4, 6, 3), width=64, strides=CAM_STRIDES, basic=False):
    super().__init__()
    nn = torch.nn
    block, expansion = (_BasicBlock, 1) if basic else (_Bottleneck, 4)
    self.conv1 = nn.Conv2d(3, width, 7, strides[0], 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    cin = width
    for i, (n, stride) in enumerate(zip(blocks, (1,) + tuple(strides[1:]))):
      planes = width * 2**i
      layer = []
      for b in range(n):
        layer.append(block(cin, planes, stride if b == 0 else 1))
        cin = planes * expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
    self.fc = nn.Linear(cin, 1000)
    with torch.no_grad():  # running statistics and affine terms as a trained net has them
      for m in self.modules():
        if isinstance(m, nn.BatchNorm2d):
          m.running_mean.uniform_(-0.2, 0.2)
          m.running_var.uniform_(0.5, 1.5)
          m.weight.uniform_(0.5, 1.5)
          m.bias.uniform_(-0.2, 0.2)
          m.num_batches_tracked.fill_(1000)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    feats = [x]
    for i in range(4):
      x = getattr(self, f"layer{i + 1}")(x)
      feats.append(x)
    return feats


def _tiny_state(blocks=(1, 1, 1, 1), width=16, basic=False) -> dict:
  """A resnet_tiny-shaped (1-1-1-1, width 16) torchvision state dict as numpy arrays."""
  assert resnet.ARCHS["resnet_tiny"] == ((1, 1, 1, 1), 16)
  torch.manual_seed(1)
  model = TorchResNet(blocks, width, basic=basic)
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _read(path) -> dict:
  return pretrained.read_flat(str(path))


def _assert_same(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------ ResNet-50 parity
@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
  torch.manual_seed(0)
  model = TorchResNet().eval()
  d = tmp_path_factory.mktemp("resnet50")
  torch.save(model.state_dict(), d / "resnet50.pth")
  # DataParallel names, nested the way training scripts save: both are undone.
  state = {"module." + k: v for k, v in model.state_dict().items()}
  torch.save({"epoch": 90, "state_dict": state}, d / "nested.pth")
  save_torch(model.state_dict(), str(d / "resnet50.safetensors"))
  return model, d


def test_resnet50_matches_torch_stage_by_stage(resnet50):
  model, d = resnet50
  s = cw.convert(str(d / "resnet50.pth"), str(d / "out.npz"))
  assert (s["arch"], s["layout"]) == ("resnet50", "torchvision")
  assert s["dropped_heads"] == ["fc.bias", "fc.weight"]
  flat = _read(d / "out.npz")
  n_torch = sum(not k.endswith("num_batches_tracked") and not k.startswith("fc.") for k in model.state_dict())
  assert len(flat) == s["tensors"] == n_torch == 265
  assert all(v.dtype == np.float32 for v in flat.values())
  assert all(k.split("/")[0] in ("params", "batch_stats") and "backbone" not in k for k in flat)

  # As the CAM stage loads it: prefix 'backbone' into the CAM net, then the backbone runs alone
  # on its running statistics (train=False).
  x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  net = cam_net.CAMNet(num_classes=21, backbone="resnet50", strides=CAM_STRIDES)
  abstract = jax.eval_shape(net.init, jax.random.key(0), jax.ShapeDtypeStruct(x.shape, jnp.float32))
  variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  variables, n = pretrained.load_into(variables, str(d / "out.npz"), prefix="backbone")
  assert n == len(flat)
  backbone = {col: variables[col]["backbone"] for col in ("params", "batch_stats")}
  ours = jax.jit(resnet.ResNet("resnet50", CAM_STRIDES).apply)(backbone, jnp.asarray(x))
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  for i, r in enumerate(ref):
    r = r.numpy().transpose(0, 2, 3, 1)
    o = np.asarray(ours[f"stage{i}"])
    assert o.shape == r.shape, i
    err = np.max(np.abs(o - r)) / np.max(np.abs(r))
    assert err < 1e-5, (f"stage{i}", err)


def test_safetensors_and_nested_pth_convert_to_the_same_tree(resnet50):
  _, d = resnet50
  ref = d / "ref.npz"
  if not ref.exists():
    cw.convert(str(d / "resnet50.pth"), str(ref), check=False)
  cw.convert(
      str(d / "resnet50.safetensors"), str(d / "st.safetensors"), arch="resnet50", layout="torchvision"
  )
  cw.convert(str(d / "nested.pth"), str(d / "nested.npz"))
  expected = _read(ref)
  _assert_same(_read(d / "st.safetensors"), expected)
  _assert_same(_read(d / "nested.npz"), expected)


# --------------------------------------------------------------------------------------- layouts
def test_caffe_names_convert_through_deeplabs_mapping(tmp_path):
  state = _tiny_state()
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "tv.pth")
  # kazuto1011's names, with the MSC `base.` prefix and an ASPP head to drop.
  caffe = _kazuto_names(state)
  caffe["base.aspp.c0.weight"] = np.zeros((21, 64, 3, 3), np.float32)
  caffe["base.aspp.c0.bias"] = np.zeros((21,), np.float32)
  assert "base.layer2.block1.reduce.conv.weight" in caffe
  save_numpy(caffe, str(tmp_path / "caffe.safetensors"))

  tv = cw.convert(str(tmp_path / "tv.pth"), str(tmp_path / "tv.npz"))
  s = cw.convert(str(tmp_path / "caffe.safetensors"), str(tmp_path / "caffe.npz"))
  assert (tv["layout"], s["layout"], s["arch"]) == ("torchvision", "caffe", "resnet_tiny")
  assert s["dropped_heads"] == ["base.aspp.c0.bias", "base.aspp.c0.weight", "base.fc.bias", "base.fc.weight"]
  _assert_same(_read(tmp_path / "caffe.npz"), _read(tmp_path / "tv.npz"))
  assert "seg.layout=caffe" in cw.summary_line(s)

  with pytest.raises(cw.ConversionError, match=r"caffe layout, not --layout=torchvision"):
    cw.convert(str(tmp_path / "caffe.safetensors"), str(tmp_path / "x.npz"), layout="torchvision")
  assert not (tmp_path / "x.npz").exists()


# ------------------------------------------------------------------------------------- refusals
class Custom:
  """A training script's object saved along with the weights."""


def test_weights_only_refuses_pickled_objects(tmp_path):
  state = {k: torch.from_numpy(v) for k, v in _tiny_state().items()}
  torch.save({**state, "config": Custom()}, tmp_path / "custom.pth")
  with pytest.raises(
      cw.ConversionError, match=r"custom\.pth: refused to unpickle.*test_convert_weights\.Custom"
  ):
    cw.convert(str(tmp_path / "custom.pth"), str(tmp_path / "out.npz"))

  marker = tmp_path / "payload_ran"

  class Payload:

    def __reduce__(self):
      return os.makedirs, (str(marker),)

  torch.save({**state, "extra": Payload()}, tmp_path / "evil.pth")
  with pytest.raises(cw.ConversionError, match=r"evil\.pth: refused to unpickle.*state_dict") as e:
    cw.convert(str(tmp_path / "evil.pth"), str(tmp_path / "out.npz"))
  assert "\n" not in str(e.value)
  assert not marker.exists() and not (tmp_path / "out.npz").exists()
  torch.load(tmp_path / "evil.pth", weights_only=False)  # the payload is live: a plain load runs it
  assert marker.exists()


@pytest.mark.parametrize(
    "case, match",
    [
        ("resnet18", r"looks like torchvision's resnet18 \(basic blocks 2-2-2-2"),
        ("arch_flag", r"is a resnet_tiny \(bottleneck blocks 1-1-1-1, stem width 16\), not --arch=resnet50"),
        ("vgg", r"no ResNet among its 4 tensors \(e\.g\. classifier\.0\.bias"),
        ("se_block", r"not part of a torchvision ResNet backbone: layer1\.0\.se\.fc1\.weight"),
        ("missing", r"1 tensors of resnet_tiny are missing: batch_stats/layer3_0/bn2/var"),
        ("resnext", r"layer1\.0\.conv2\.weight converts to params/layer1_0/conv2/kernel of shape"),
        ("not_tensor", r"entries that are not tensors \(arch\)"),
        ("src_ext", r"w\.ckpt: unknown checkpoint type"),
        ("caffemodel", r"convert it to \.pth first"),
        ("dst_ext", r"--dst=.*out\.pt: write \.npz or \.safetensors"),
    ],
)
def test_bad_checkpoints_are_named(tmp_path, case, match):
  state, kw, src, dst = _tiny_state(), {}, tmp_path / "w.safetensors", tmp_path / "out.npz"
  if case == "resnet18":
    state = _tiny_state(blocks=(2, 2, 2, 2), width=8, basic=True)
  elif case == "arch_flag":
    kw = {"arch": "resnet50"}
  elif case == "vgg":
    state = {
        f"{m}.0.{p}": np.ones(3, np.float32) for m in ("features", "classifier") for p in ("weight", "bias")
    }
  elif case == "se_block":
    state["layer1.0.se.fc1.weight"] = np.ones((4, 64, 1, 1), np.float32)
  elif case == "missing":
    del state["layer3.0.bn2.running_var"]
  elif case == "resnext":
    state["layer1.0.conv2.weight"] = np.ascontiguousarray(
        state["layer1.0.conv2.weight"][:, :4]
    )  # grouped conv
  elif case == "not_tensor":
    src = tmp_path / "w.pth"
    torch.save({"arch": "resnet50", **{k: torch.from_numpy(v) for k, v in state.items()}}, src)
  elif case in ("src_ext", "caffemodel"):
    src = tmp_path / ("w.ckpt" if case == "src_ext" else "init.caffemodel")
    src.write_bytes(b"\0")
  elif case == "dst_ext":
    dst = tmp_path / "out.pt"
  if not src.exists():
    save_numpy(state, str(src))
  with pytest.raises(cw.ConversionError, match=match) as e:
    cw.convert(str(src), str(dst), **kw)
  assert "\n" not in str(e.value) and (case == "dst_ext" or str(src) in str(e.value))
  assert sorted(os.listdir(tmp_path)) == [src.name]  # no output, no temp file left


def test_existing_output_is_kept_without_overwrite(tmp_path):
  save_numpy(_tiny_state(), str(tmp_path / "w.safetensors"))
  dst = tmp_path / "out.npz"
  dst.write_bytes(b"old weights")
  with pytest.raises(FileExistsError, match=r"out\.npz exists; pass --overwrite"):
    cw.convert(str(tmp_path / "w.safetensors"), str(dst))
  assert dst.read_bytes() == b"old weights"
  cw.convert(str(tmp_path / "w.safetensors"), str(dst), overwrite=True)
  assert len(_read(dst)) == 85
  assert sorted(os.listdir(tmp_path)) == ["out.npz", "w.safetensors"]


# ----------------------------------------------------------------------------------- the command
def _run(*args):
  return subprocess.run(
      [sys.executable, "-m", "cpal_jax.convert_weights", *args],
      cwd=REPO,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      capture_output=True,
      text=True,
      timeout=120,
  )


def test_command_line(tmp_path):
  state = _tiny_state()
  save_numpy(state, str(tmp_path / "w.safetensors"))
  dst = tmp_path / "weights" / "tiny.npz"  # the folder is created
  r = _run(f"--src={tmp_path / 'w.safetensors'}", f"--dst={dst}")
  assert r.returncode == 0, r.stderr
  assert f"{dst}: 85 tensors" in r.stdout and "resnet_tiny torchvision layout" in r.stdout
  assert "dropped 2 head tensors (fc.bias, fc.weight)" in r.stdout
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "w.pth")
  cw.convert(str(tmp_path / "w.pth"), str(tmp_path / "in_process.npz"))
  _assert_same(_read(dst), _read(tmp_path / "in_process.npz"))

  before = dst.read_bytes()
  r = _run(f"--src={tmp_path / 'w.safetensors'}", f"--dst={dst}", "--arch=resnet101")
  assert r.returncode != 0
  assert r.stderr.strip() == f"convert_weights: error: {dst} exists; pass --overwrite to replace it"
  assert dst.read_bytes() == before
