"""Converts a PyTorch ResNet checkpoint into the backbone weights that `models.pretrained` loads.

  python -m cpal_jax.convert_weights --src=resnet50-0676ba61.pth --dst=weights/resnet50.npz
  python -m cpal_jax.convert_weights --src=resnet101-63fe2227.pth --dst=weights/resnet101.npz
  python -m cpal_jax.convert_weights --src=deeplabv1_resnet101-imagenet.pth \\
      --dst=weights/deeplab_resnet101_caffe.npz          # kazuto1011's caffe names: layout detected

Sources: torchvision-named ResNets (`conv1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...; also
timm's) and kazuto1011's DeepLab names of the caffe MSRA ResNet (`layer1.conv1.conv`,
`layer2.block1.reduce.bn`, with or without the MSC `base.` prefix), as .pth/.pt (read with
`torch.load(weights_only=True)`: tensors only, no arbitrary unpickling) or .safetensors; the state
dict may be nested under "state_dict" or "model", and a DataParallel `module.` prefix is stripped.
The names map through `models.deeplab.convert_torch_state`, the one mapping of both layouts.

Output: .npz or .safetensors, float32, keyed by the bare backbone's Flax paths
(`params/layer1_0/conv1/kernel`, `batch_stats/bn1/mean`, ...), which `pretrained.load_into(...,
prefix="backbone")` puts into the CAM net (model.pretrained), IRN (refine.irn.pretrained) and DeepLab
(seg.pretrained). The ImageNet/ASPP heads (`fc`, `classifier`, `aspp`) and `num_batches_tracked`
are dropped. The architecture is read off the checkpoint (blocks per stage, stem width) and every
backbone tensor must be present with its shape; the file is written atomically, never over an
existing one without --overwrite, and (--check, default) read back through `load_into`.

An upstream SIPE checkpoint (chenqi1126/SIPE train_resnet50_SIPE.py saves {"net": state_dict} with
the backbone under `resnet50.`, the same modules again under `stage0-4.`/`backbone.` and the heads
`side1-4`/`classifier` again under `newly_added.`) converts to the whole CAM network
(`params/backbone/...`, `params/side1/kernel`, ..., `params/classifier/kernel`): every alias must
equal the tensor it repeats. Read it with make_cam as `cam.weights` (no training), or start a run
from it with `model.pretrained`.

  python -m cpal_jax.convert_weights --src=sipe_voc/ckpt/final.pth --dst=weights/sipe_voc.npz

The caffe layout is only right for DeepLab with seg.layout=caffe: those weights expect the stride on
the first 1x1 conv, a ceil-mode stem pool and BGR 0..255 input; the CAM and IRN nets are torchvision
ResNets and take torchvision weights.
"""

import os
import pickle
import re
import sys
from typing import Mapping

import numpy as np

from cpal_jax import paths
from cpal_jax.models import cam_net, deeplab, pretrained, resnet

SOURCE_EXTS = (".pth", ".pt", ".pth.tar", ".bin", ".safetensors")
DEST_EXTS = (".npz", ".safetensors")
HEAD_MODULES = ("fc", "classifier", "aspp")  # ImageNet / segmentation heads: another label set
NESTED_KEYS = ("state_dict", "model", "net")  # "net": SIPE's checkpoints
# Other torchvision ResNets, to name what a checkpoint is when it is not one of ours.
_OTHER_RESNETS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 8, 36, 3)): "resnet152",
}
_BN_TORCH_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_TORCHVISION_KEY = re.compile(r"^layer\d+\.\d+\.")
_CAFFE_KEY = re.compile(r"^layer\d+\.(conv1\.(conv|bn)|block\d+\.)")
SIPE_HEADS = ("side1", "side2", "side3", "side4", "classifier")
# SIPE's Net registers each module twice: stage0 = (conv1, bn1, relu, maxpool), stage1-4 = (layerK,),
# backbone = [stage0..4], newly_added = [classifier, side1..4]. (alias pattern, what it repeats)
_SIPE_ALIASES = (
    (re.compile(r"^backbone\.(\d)\."), r"stage\1."),
    (re.compile(r"^stage0\.0\."), "resnet50.conv1."),
    (re.compile(r"^stage0\.1\."), "resnet50.bn1."),
    (re.compile(r"^stage([1-4])\.0\."), r"resnet50.layer\1."),
    (re.compile(r"^newly_added\.0\."), "classifier."),
    (re.compile(r"^newly_added\.([1-4])\."), r"side\1."),
)


class ConversionError(ValueError):
  """A checkpoint that cannot become our backbone; the message names the file and the fix."""


def _examples(names, n: int = 3) -> str:
  names = sorted(names)
  more = f", ... ({len(names)} in all)" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------ reading
def _read_pth(path: str):
  import torch  # only here: the package never needs torch otherwise

  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's message is paragraphs of advice (including to load with weights_only=False); keep the
    # line naming what the weights-only unpickler met.
    boiler = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [l.strip() for l in str(e).splitlines() if l.strip() and not l.strip().startswith(boiler)]
    glob = [l for l in lines if "global" in l.lower()]
    if glob:
      raise ConversionError(
          f"{path}: refused to unpickle: it holds Python objects besides tensors "
          f"({glob[0].split('. ')[0][:160]}); re-save just the weights, e.g. "
          "torch.save(model.state_dict(), path), or as .safetensors"
      ) from None
    detail = lines[-1][:160] if lines else _first_line(e)[:160]
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
  except Exception as e:  # corrupt file, not a torch archive, ...
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint: {_first_line(e)[:200]}") from None


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # bfloat16/float16 have no (or a lossy) numpy path
    return value.numpy()
  return np.asarray(value)


def _read_safetensors(path: str) -> dict:
  from safetensors.numpy import load_file

  try:
    return load_file(path)
  except TypeError:  # a dtype numpy lacks (bfloat16): torch reads it
    try:
      from safetensors.torch import load_file as load_torch
    except ImportError:
      raise ConversionError(f"{path}: holds bfloat16 tensors; install torch to convert it") from None
    return load_torch(path)
  except Exception as e:
    raise ConversionError(f"{path}: not a readable safetensors file: {_first_line(e)[:200]}") from None


def read_state(path: str) -> dict[str, np.ndarray]:
  """The checkpoint's tensors by name (nesting and `module.` prefixes removed), as numpy arrays."""
  if path.endswith(".caffemodel"):
    raise ConversionError(
        f"{path}: a caffe model; convert it to .pth first (kazuto1011/deeplab-pytorch scripts/convert.py)"
    )
  if not path.endswith(SOURCE_EXTS):
    raise ConversionError(f"{path}: unknown checkpoint type; expected one of {', '.join(SOURCE_EXTS)}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such checkpoint (--src)")
  obj = _read_safetensors(path) if path.endswith(".safetensors") else _read_pth(path)
  for key in NESTED_KEYS:
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise ConversionError(
        f"{path}: holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead"
    )
  out, other = {}, []
  for key, value in obj.items():
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
      other.append(str(key))
      continue
    name = str(key)
    while name.startswith("module."):
      name = name[len("module.") :]
    out[name] = _to_numpy(value)
  if other:
    raise ConversionError(
        f"{path}: entries that are not tensors ({_examples(other)}); pass a plain state dict, "
        f"or one nested under {' or '.join(repr(k) for k in NESTED_KEYS)}"
    )
  return out


# ----------------------------------------------------------------------------------------- mapping
LAYOUTS = deeplab.LAYOUTS + ("sipe",)


def _check_layout_flag(layout: str) -> None:
  if layout != "auto" and layout not in LAYOUTS:
    raise ConversionError(f"--layout={layout}: choose auto or one of {', '.join(LAYOUTS)}")


def is_sipe(names) -> bool:
  """An upstream SIPE network: its backbone under `resnet50.` beside the side and classifier heads."""
  names = set(names)
  return any(n.startswith("resnet50.") for n in names) and all(f"{h}.weight" in names for h in SIPE_HEADS)


def detect_layout(names, path: str, layout: str = "auto") -> str:
  if is_sipe(names):
    if layout not in ("auto", "sipe"):
      raise ConversionError(f"{path}: an upstream SIPE network, not --layout={layout}; drop --layout")
    return "sipe"
  bare = [n[len("base.") :] if n.startswith("base.") else n for n in names]
  found = [
      name
      for name, pattern in (("torchvision", _TORCHVISION_KEY), ("caffe", _CAFFE_KEY))
      if any(pattern.match(n) for n in bare)
  ]
  if not found:
    raise ConversionError(
        f"{path}: no ResNet among its {len(bare)} tensors (e.g. {_examples(bare)}); expected torchvision "
        "names (conv1.weight, layer1.0.conv1.weight, ...) or kazuto1011's caffe DeepLab names "
        "(layer1.conv1.conv.weight, layer2.block1.reduce.conv.weight, ...)"
    )
  if len(found) > 1:
    raise ConversionError(f"{path}: mixes torchvision and caffe ResNet names; convert one network at a time")
  if layout != "auto":
    _check_layout_flag(layout)
    if layout != found[0]:
      raise ConversionError(
          f"{path}: its names are the {found[0]} layout, not --layout={layout}; drop --layout or pass "
          f"--layout={found[0]}"
      )
  return found[0]


def _is_backbone(name: str, layout: str) -> bool:
  module, _, leaf = name.rpartition(".")
  try:
    found = deeplab.torch_module_name(module, layout)
  except ValueError:  # e.g. `layer2.blockX`: not a name of the layout
    return False
  if found is None:
    return False
  return leaf == "weight" if found[1] == "conv" else leaf in _BN_TORCH_LEAVES


def to_backbone(state: Mapping[str, np.ndarray], layout: str, path: str) -> tuple[dict, dict, list]:
  """-> (flat float32 backbone tensors, our key -> source key, dropped head tensor names).

  Every other tensor (an SE block, a stray buffer, ...) is an error rather than silently left out."""
  flat, origin, heads, unexpected = {}, {}, [], []
  for key, value in state.items():
    name = key[len("base.") :] if key.startswith("base.") else key
    if name.endswith(".num_batches_tracked"):
      continue
    if name.split(".")[0] in HEAD_MODULES:
      heads.append(key)
      continue
    if not _is_backbone(name, layout):
      unexpected.append(key)
      continue
    for ours, array in deeplab.convert_torch_state({key: value}, layout).items():
      if ours in flat:
        raise ConversionError(f"{path}: {origin[ours]} and {key} both give {ours}; keep one network")
      flat[ours] = np.ascontiguousarray(array, dtype=np.float32)
      origin[ours] = key
  if unexpected:
    raise ConversionError(
        f"{path}: tensors that are not part of a {layout} ResNet backbone: {_examples(unexpected)}; "
        "is it another architecture (SE/ResNeXt blocks, a detector) or the other --layout?"
    )
  return flat, origin, heads


def _sipe_alias_of(name: str) -> str | None:
  """The primary name a SIPE alias repeats (resolved through backbone -> stage -> resnet50), or None."""
  out = name
  for pattern, repl in _SIPE_ALIASES:
    out = pattern.sub(repl, out, count=1)
  return out if out != name else None


def sipe_to_cam_net(state: Mapping[str, np.ndarray], path: str) -> tuple[dict, dict, list]:
  """-> (flat CAM-network tensors, our key -> source key, dropped alias names) of a SIPE checkpoint."""
  primaries, aliases = {}, []
  for key, value in state.items():
    if key.endswith(".num_batches_tracked"):
      continue
    target = _sipe_alias_of(key)
    if target is None:
      primaries[key] = value
    else:
      aliases.append((key, target))
  for key, target in aliases:
    if target not in primaries:
      raise ConversionError(f"{path}: {key} repeats {target}, which the checkpoint does not hold")
    if not np.array_equal(state[key], primaries[target]):
      raise ConversionError(f"{path}: {key} and {target} are one module in SIPE's network but differ")
  backbone = {k[len("resnet50.") :]: v for k, v in primaries.items() if k.startswith("resnet50.")}
  other = [k for k in primaries if not k.startswith("resnet50.") and k.split(".")[0] not in SIPE_HEADS]
  if other:
    raise ConversionError(
        f"{path}: tensors that are not part of SIPE's network (resnet50, side1-4, classifier): "
        f"{_examples(other)}"
    )
  flat_bb, origin_bb, heads = to_backbone(backbone, "torchvision", path)
  if heads:
    raise ConversionError(f"{path}: resnet50.{heads[0]} is not part of SIPE's backbone")
  flat, origin = {}, {}
  for ours, array in flat_bb.items():
    col, _, rest = ours.partition("/")
    flat[f"{col}/backbone/{rest}"] = array
    origin[f"{col}/backbone/{rest}"] = "resnet50." + origin_bb[ours]
  for head in SIPE_HEADS:
    key = f"{head}.weight"
    w = np.asarray(primaries[key], np.float32)
    if w.ndim != 4 or w.shape[2:] != (1, 1):
      raise ConversionError(f"{path}: {key} has shape {w.shape}; SIPE's heads are 1x1 convolutions")
    if f"{head}.bias" in primaries:
      raise ConversionError(f"{path}: {head}.bias: SIPE's heads have no bias; is it another network?")
    flat[f"params/{head}/kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    origin[f"params/{head}/kernel"] = key
  return flat, origin, sorted(k for k, _ in aliases)


def cam_net_variables(flat: Mapping[str, np.ndarray], arch: str):
  """The CAM network's variables as shapes, for the classes and side widths of the heads in `flat`."""
  import jax
  import jax.numpy as jnp

  model = cam_net.CAMNet(
      num_classes=int(flat["params/classifier/kernel"].shape[-1]) + 1,
      backbone=arch,
      side_dims=tuple(int(flat[f"params/side{i}/kernel"].shape[-1]) for i in range(1, 5)),
  )
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def describe(flat: Mapping[str, np.ndarray]) -> tuple[bool, tuple[int, ...], int]:
  """(bottleneck blocks?, blocks per stage, stem width) of converted backbone tensors."""
  blocks: dict[int, set] = {}
  for key in flat:
    m = re.match(r"(?:params|batch_stats)/(?:backbone/)?layer(\d+)_(\d+)/", key)
    if m:
      blocks.setdefault(int(m[1]), set()).add(int(m[2]))
  counts = tuple(len(blocks.get(i, ())) for i in range(1, 1 + max([4, *blocks])))
  stem = flat.get("params/conv1/kernel", flat.get("params/backbone/conv1/kernel"))
  width = int(stem.shape[-1]) if stem is not None else 0
  return any("/conv3/" in k for k in flat), counts, width


def detect_arch(flat: Mapping[str, np.ndarray], path: str, arch: str = "auto") -> str:
  bottleneck, counts, width = describe(flat)
  kind = "bottleneck" if bottleneck else "basic"
  what = f"{kind} blocks {'-'.join(map(str, counts))}, stem width {width}"
  matches = [a for a, (b, w) in resnet.ARCHS.items() if bottleneck and b == counts and w == width]
  if arch != "auto":
    if arch not in resnet.ARCHS:
      raise ConversionError(f"--arch={arch}: choose auto or one of {', '.join(resnet.ARCHS)}")
    if matches and arch not in matches:
      raise ConversionError(
          f"{path}: the checkpoint is a {matches[0]} ({what}), not --arch={arch}; drop --arch or pass "
          f"--arch={matches[0]}"
      )
    return arch  # no match: the shape check names what differs from the requested arch
  if matches:
    return matches[0]
  other = _OTHER_RESNETS.get((bottleneck, counts))
  looks = f"it looks like torchvision's {other}" if other else "an unknown ResNet"
  ours = ", ".join(f"{a} ({'-'.join(map(str, b))}, width {w})" for a, (b, w) in resnet.ARCHS.items())
  raise ConversionError(f"{path}: {looks} ({what}); the backbones here are bottleneck ResNets: {ours}")


def abstract_variables(arch: str):
  """The bare ResNet's variables as shapes only (no compute, no memory)."""
  import jax
  import jax.numpy as jnp

  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(resnet.ResNet(arch).init, jax.random.key(0), x)


def _flat_shapes(tree) -> dict[str, tuple]:
  from flax import traverse_util

  return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def check_complete(
    flat: Mapping[str, np.ndarray], origin: Mapping[str, str], expected: dict, arch: str, path: str
):
  """Every backbone tensor of `arch`, each with its shape, and nothing else."""
  missing = set(expected) - set(flat)
  if missing:
    raise ConversionError(f"{path}: {len(missing)} tensors of {arch} are missing: {_examples(missing)}")
  extra = set(flat) - set(expected)
  if extra:
    named = [f"{origin[k]} -> {k}" for k in extra]
    raise ConversionError(f"{path}: tensors {arch} does not have: {_examples(named)}; is --arch right?")
  for key, shape in sorted(expected.items()):
    if tuple(flat[key].shape) != shape:
      got = flat[key].shape
      raise ConversionError(
          f"{path}: {origin[key]} converts to {key} of shape {got}, {arch} expects {shape} "
          "(a wide ResNet or ResNeXt has other widths; only plain ResNets convert)"
      )


# ----------------------------------------------------------------------------------------- writing
def _write(flat: dict, path: str) -> None:
  if path.endswith(".npz"):
    with open(path, "wb") as f:  # a file object: numpy appends no second .npz
      np.savez(f, **flat)
  else:
    from safetensors.numpy import save_file

    save_file(flat, path)


def _read_back(abstract, path: str, flat: dict) -> None:
  """Loads the written file as the training stages do and compares every tensor."""
  import jax

  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  try:
    tree, n = pretrained.load_into(zeros, path)
  except (KeyError, ValueError) as e:
    raise ConversionError(f"--check: {e.args[0] if e.args else e}") from None
  from flax import traverse_util

  loaded = {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}
  bad = [k for k in flat if not np.array_equal(loaded[k], flat[k])]
  if n != len(flat) or bad:
    raise ConversionError(
        f"--check: {path} read back {n} of {len(flat)} tensors, differing: {_examples(bad)}"
    )


def convert(
    src: str,
    dst: str,
    layout: str = "auto",
    arch: str = "auto",
    overwrite: bool = False,
    check: bool = True,
) -> dict:
  """Converts src into dst; returns a summary (tensors, values, arch, layout, dropped heads)."""
  if not dst.endswith(DEST_EXTS):
    raise ConversionError(f"--dst={dst}: write .npz or .safetensors (what models.pretrained reads)")
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
  _check_layout_flag(layout)
  state = read_state(src)
  layout = detect_layout(state, src, layout)
  if layout == "sipe":
    flat, origin, heads = sipe_to_cam_net(state, src)
    arch = detect_arch(flat, src, arch)
    abstract = cam_net_variables(flat, arch)
  else:
    flat, origin, heads = to_backbone(state, layout, src)
    arch = detect_arch(flat, src, arch)
    abstract = abstract_variables(arch)
  check_complete(flat, origin, _flat_shapes(abstract), arch, src)

  with paths.atomic(dst) as tmp:  # same extension: load_into reads by it
    _write(flat, tmp)
    if check:
      _read_back(abstract, tmp, flat)
    if os.path.exists(dst) and not overwrite:  # appeared while converting
      raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
  return {
      "src": src,
      "dst": dst,
      "arch": arch,
      "layout": layout,
      "tensors": len(flat),
      "values": int(sum(v.size for v in flat.values())),
      "dropped_heads": sorted(heads),
      "checked": check,
  }


def summary_line(s: dict) -> str:
  use = {
      "torchvision": "model.pretrained, refine.irn.pretrained or seg.pretrained with seg.layout=torchvision",
      "caffe": "seg.pretrained with seg.layout=caffe (not the CAM/IRN nets: torchvision ResNets)",
      "sipe": "cam.weights (make_cam reads it, no training) or model.pretrained (the whole CAM net)",
  }[s["layout"]]
  dropped = "module aliases" if s["layout"] == "sipe" else "head tensors"
  heads = f"dropped {len(s['dropped_heads'])} {dropped}" + (
      f" ({_examples(s['dropped_heads'], 4)})" if s["dropped_heads"] else ""
  )
  return (
      f"{s['dst']}: {s['tensors']} tensors, {s['values'] / 1e6:.1f}M float32 values, {s['arch']} "
      f"{s['layout']} layout from {s['src']}; {heads}; "
      f"{'checked with load_into; ' if s['checked'] else ''}use as {use} (backbone {s['arch']})"
  )


def cli() -> None:
  from absl import app, flags

  src = flags.DEFINE_string("src", None, "PyTorch checkpoint: .pth/.pt/.pth.tar/.bin or .safetensors.")
  dst = flags.DEFINE_string("dst", None, "Output weights: .npz or .safetensors.")
  layout = flags.DEFINE_enum("layout", "auto", ("auto",) + LAYOUTS, "Name layout; auto detects it.")
  arch = flags.DEFINE_enum("arch", "auto", ("auto",) + tuple(resnet.ARCHS), "Backbone; auto detects it.")
  overwrite = flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
  check = flags.DEFINE_bool("check", True, "Read the written file back through models.pretrained.load_into.")
  flags.mark_flags_as_required(["src", "dst"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --src, --dst, --layout, --arch")
    if not os.environ.get("JAX_PLATFORMS"):
      import jax

      # Shapes only: no accelerator to probe or preallocate next to a training run.
      jax.config.update("jax_platforms", "cpu")
    try:
      s = convert(src.value, dst.value, layout.value, arch.value, overwrite.value, check.value)
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
      sys.exit(f"convert_weights: error: {e}")
    print(summary_line(s))

  app.run(main)


if __name__ == "__main__":
  cli()
