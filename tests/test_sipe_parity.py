"""make_cam's SIPE read against upstream SIPE's own inference, transcribed in PyTorch.

A SIPE network (chenqi1126/SIPE network/resnet50_SIPE.py, class CAM, on a resnet_tiny-shaped
backbone) with random weights is saved the way train_resnet50_SIPE.py saves it, converted by
`cpal_jax.convert_weights`, and read by our make_cam (cam.weights, the default read: flip fused at
the features, scales summed unnormalised and max-normalised once, no padding) on VOC-layout images of
odd sizes. Upstream's make_cam.py loop runs on the same images: the IS_CAM arrays must agree.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cpal_jax import convert_weights as cw, paths
from cpal_jax import stages as cli
from cpal_jax.infer import cam as infer_cam
from test_convert_weights import TorchResNet
from test_voc import voc_palette, write_xml

import voc as voc_config  # configs/voc.py (conftest puts configs/ on the path)

SCALES = (1.0, 0.5, 1.5, 2.0)
# Odd sizes in both directions, none a multiple of the output stride (16).
IMAGES = {
    "2007_000101": (75, 61, ["dog", "person"]),
    "2007_000102": (53, 89, ["cat"]),
    "2008_000103": (97, 71, ["bottle", "chair", "sofa"]),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TorchSIPE(torch.nn.Module):
  """network/resnet50_SIPE.py: Net's modules (each registered twice, as upstream) and CAM.forward,
  with `.cuda()` dropped."""

  def __init__(self, num_cls=21, side_dims=(32, 32, 64, 64)):
    super().__init__()
    nn = torch.nn
    self.num_cls = num_cls
    self.resnet50 = TorchResNet(blocks=(1, 1, 1, 1), width=16)
    del self.resnet50.fc  # upstream's resnet50.py has none
    r = self.resnet50
    self.stage0 = nn.Sequential(r.conv1, r.bn1, nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    self.stage1 = nn.Sequential(r.layer1)
    self.stage2 = nn.Sequential(r.layer2)
    self.stage3 = nn.Sequential(r.layer3)
    self.stage4 = nn.Sequential(r.layer4)
    chans = (64, 128, 256, 512)
    for i, (c, d) in enumerate(zip(chans, side_dims)):
      setattr(self, f"side{i + 1}", nn.Conv2d(c, d, 1, bias=False))
    self.classifier = nn.Conv2d(512, num_cls - 1, 1, bias=False)
    self.backbone = nn.ModuleList([self.stage0, self.stage1, self.stage2, self.stage3, self.stage4])
    self.newly_added = nn.ModuleList([self.classifier, self.side1, self.side2, self.side3, self.side4])

  def get_seed(self, norm_cam, label, feature):
    n, c, h, w = norm_cam.shape
    seeds = torch.zeros((n, h, w, c))
    feature_s = feature.view(n, -1, h * w)
    feature_s = feature_s / (torch.norm(feature_s, dim=1, keepdim=True) + 1e-5)
    correlation = F.relu(torch.matmul(feature_s.transpose(2, 1), feature_s), inplace=True).unsqueeze(1)
    cam_flatten = norm_cam.view(n, -1, h * w).unsqueeze(2)
    inter = (correlation * cam_flatten).sum(-1)
    union = correlation.sum(-1) + cam_flatten.sum(-1) - inter
    miou = (inter / union).view(n, self.num_cls, h, w)
    miou[:, 0] = miou[:, 0] * 0.5
    probs = F.softmax(miou, dim=1)
    belonging = miou.argmax(1)
    seeds = seeds.scatter_(-1, belonging.view(n, h, w, 1), 1).permute(0, 3, 1, 2).contiguous()
    seeds = seeds * label
    return seeds, probs

  def get_prototype(self, seeds, feature):
    n, c, h, w = feature.shape
    seeds = F.interpolate(seeds, feature.shape[2:], mode="nearest")
    crop_feature = seeds.unsqueeze(2) * feature.unsqueeze(1)
    return F.adaptive_avg_pool2d(crop_feature.view(-1, c, h, w), (1, 1)).view(n, self.num_cls, c, 1, 1)

  def reactivate(self, prototype, feature):
    is_cam = F.relu(torch.cosine_similarity(feature.unsqueeze(1), prototype, dim=2))
    return F.interpolate(is_cam, feature.shape[2:], mode="bilinear", align_corners=True)

  def forward(self, x, label):
    x0 = self.stage0(x)
    x1 = self.stage1(x0)
    x2 = self.stage2(x1).detach()
    x3 = self.stage3(x2)
    x4 = self.stage4(x3)
    sides = [getattr(self, f"side{i + 1}")(f.detach()) for i, f in enumerate((x1, x2, x3, x4))]
    size = sides[2].shape[2:]
    hie_fea = torch.cat(
        [F.interpolate(s / (torch.norm(s, dim=1, keepdim=True) + 1e-5), size, mode="bilinear") for s in sides], dim=1
    )
    cam = self.classifier(x4)
    cam = (cam[0] + cam[1].flip(-1)).unsqueeze(0)
    hie_fea = (hie_fea[0] + hie_fea[1].flip(-1)).unsqueeze(0)
    norm_cam = F.relu(cam)
    norm_cam = norm_cam / (F.adaptive_max_pool2d(norm_cam, (1, 1)) + 1e-5)
    cam_bkg = 1 - torch.max(norm_cam, dim=1)[0].unsqueeze(1)
    norm_cam = torch.cat([cam_bkg, norm_cam], dim=1)
    norm_cam = F.interpolate(norm_cam, size, mode="bilinear", align_corners=True)
    seeds, _ = self.get_seed(norm_cam.clone(), label.unsqueeze(0).clone(), hie_fea.clone())
    prototypes = self.get_prototype(seeds, hie_fea)
    is_cam = self.reactivate(prototypes, hie_fea)
    return norm_cam[0], is_cam[0]


def upstream_make_cam(model, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """make_cam.py's loop for one image (data_voc.py's MSF dataset: pil_rescale order 3, Normalize,
  the image and its flip as a batch of two). Returns (keys, IS_CAM)."""
  label = np.concatenate([[1.0], label]).astype(np.float32)  # F.pad(label, (1, 0), value=1)
  h, w = image.shape[:2]
  outputs = []
  with torch.no_grad():
    for s in SCALES:
      img = image
      if s != 1:
        img = np.asarray(Image.fromarray(image).resize((int(np.round(w * s)), int(np.round(h * s))), Image.BICUBIC))
      x = (img.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
      x = np.ascontiguousarray(x.transpose(2, 0, 1), np.float32)
      pair = torch.from_numpy(np.stack([x, np.flip(x, -1).copy()]))
      outputs.append(model(pair, torch.from_numpy(label)[:, None, None])[1])
    up = [F.interpolate(o.unsqueeze(1), (h, w), mode="bilinear", align_corners=False) for o in outputs]
    is_cam = torch.sum(torch.stack(up, 0), 0)[:, 0]
    is_cam /= F.adaptive_max_pool2d(is_cam, (1, 1)) + 1e-5
  keys = np.flatnonzero(label)
  return keys, is_cam.numpy()[keys]


def _voc_tree(root):
  rng = np.random.default_rng(0)
  for d in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
    (root / d).mkdir(parents=True)
  for image_id, (h, w, objects) in IMAGES.items():
    # Smooth colour fields plus noise: resampling and the flip both matter on such images.
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + k) * np.cos(5 * yy - k) for k in range(3)], -1) * 90 + 128
    rgb = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    png = Image.fromarray(np.zeros((h, w), np.uint8))
    png.putpalette(voc_palette())
    png.save(root / "SegmentationClass" / f"{image_id}.png")
    write_xml(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", (h, w), [(o, 0) for o in objects])
  (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(IMAGES) + "\n")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  d = tmp_path_factory.mktemp("sipe")
  torch.manual_seed(0)
  model = TorchSIPE().eval()
  from cpal_jax.data import voc

  # As a trained classifier: CAMs of the classes in no test image stay at or below zero (x4 >= 0),
  # so the seeds' argmax meets the images' own classes (with random signs it rarely does).
  used = {voc.VOC_CLASSES.index(o) - 1 for _, _, objects in IMAGES.values() for o in objects}
  with torch.no_grad():
    w = model.classifier.weight
    for c in range(w.shape[0]):
      w[c] = w[c].abs() if c in used else -w[c].abs()
  torch.save({"net": model.state_dict()}, d / "final.pth")  # as train_resnet50_SIPE.py saves it
  summary = cw.convert(str(d / "final.pth"), str(d / "sipe.npz"))
  return model, d, summary


def test_sipe_checkpoint_converts_to_the_whole_cam_network(converted):
  model, d, s = converted
  assert (s["layout"], s["arch"]) == ("sipe", "resnet_tiny")
  with np.load(d / "sipe.npz") as f:
    keys = set(f.files)
  assert {f"params/side{i}/kernel" for i in range(1, 5)} | {"params/classifier/kernel"} <= keys
  assert "params/backbone/layer4_0/conv3/kernel" in keys and "batch_stats/backbone/bn1/mean" in keys
  # Every alias (stage*, backbone.*, newly_added.*) was checked against its module and dropped.
  assert any(k.startswith("newly_added.") for k in s["dropped_heads"])
  assert any(k.startswith("backbone.4.") for k in s["dropped_heads"])


def test_an_alias_that_differs_is_refused(converted, tmp_path):
  model, _, _ = converted
  state = {k: v.clone() for k, v in model.state_dict().items()}
  state["newly_added.2.weight"] += 1.0  # side2's alias
  torch.save({"net": state}, tmp_path / "bad.pth")
  with pytest.raises(cw.ConversionError, match=r"newly_added\.2\.weight and side2\.weight are one module"):
    cw.convert(str(tmp_path / "bad.pth"), str(tmp_path / "bad.npz"))


def _config(root, weights, method="sipe"):
  c = voc_config.get_config()
  c.data.root = str(root)
  c.data.train_split = "train"
  c.data.eval_split = "train"
  c.data.workers = 0
  c.model.backbone = "resnet_tiny"
  c.model.pretrained = ""
  c.method.name = method
  c.cam.split = "train"
  c.cam.scales = SCALES
  c.cam.pad_multiple = 0
  c.cam.write_npy = True
  c.cam.weights = str(weights)
  c.mesh.data = 1
  c.train.batch_size = 1
  c.train.crop_size = 32
  c.report.enabled = False
  c.stages = "make_cam"
  return c


def test_make_cam_reads_a_sipe_model_as_upstream_does(converted, tmp_path):
  model, d, _ = converted
  _voc_tree(tmp_path / "VOC2012")
  workdir = tmp_path / "run"
  summary = cli.run(_config(tmp_path / "VOC2012", d / "sipe.npz"), str(workdir))
  assert summary["make_cam"]["written"] == len(IMAGES) and summary["make_cam"]["checkpoint_step"] is None
  from cpal_jax.data import voc

  peaks = []
  for image_id, (h, w, objects) in IMAGES.items():
    label = np.zeros(20, np.float32)
    label[[voc.VOC_CLASSES.index(o) - 1 for o in objects]] = 1
    image = np.asarray(Image.open(tmp_path / "VOC2012" / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
    keys, want = upstream_make_cam(model, image, label)
    ours = np.load(paths.cam_map(str(workdir), image_id)[:-4] + ".npy", allow_pickle=True).item()
    np.testing.assert_array_equal(ours["keys"], keys)
    assert ours["IS_CAM"].shape == want.shape == (len(keys), h, w)
    peaks.append(want.max())
    np.testing.assert_allclose(ours["IS_CAM"], want, atol=2e-4, err_msg=image_id)
  # Lit maps, so the comparison is not of zeros (an image whose seeds all go to classes it lacks
  # has none, on both sides: upstream's argmax runs over every class, then drops the absent ones).
  assert sum(p > 0.99 for p in peaks) >= 2, peaks
  protocol = json.loads(open(paths.cam_protocol(str(workdir))).read())
  assert protocol["weights"] == infer_cam.weights_digest(str(d / "sipe.npz"))


def test_cam_weights_refuses_a_backbone_and_cpal_without_a_bank(converted, tmp_path):
  _, d, _ = converted
  _voc_tree(tmp_path / "VOC2012")
  with pytest.raises(ValueError, match="refresh_bank=True"):
    cli.run(_config(tmp_path / "VOC2012", d / "sipe.npz", method="cpal"), str(tmp_path / "cpal"))
  flat = dict(np.load(d / "sipe.npz"))
  np.savez(tmp_path / "backbone.npz", **{k: v for k, v in flat.items() if "/backbone/" in k})
  with pytest.raises(ValueError, match="a whole network is needed"):
    cli.run(_config(tmp_path / "VOC2012", tmp_path / "backbone.npz"), str(tmp_path / "bb"))


def test_model_pretrained_takes_the_whole_network(converted):
  """model.pretrained with a converted SIPE model starts training from all of it, heads included."""
  import jax
  import jax.numpy as jnp

  from cpal_jax.models import cam_net, pretrained

  _, d, _ = converted
  model = cam_net.CAMNet(num_classes=21, backbone="resnet_tiny", side_dims=(32, 32, 64, 64))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  loaded, n = pretrained.load_into(variables, str(d / "sipe.npz"), prefix="backbone")
  assert n == len(jax.tree.leaves(variables))
  with np.load(d / "sipe.npz") as f:
    np.testing.assert_array_equal(loaded["params"]["side3"]["kernel"], f["params/side3/kernel"])


def test_cpal_reads_a_sipe_model_with_a_refreshed_bank(converted, tmp_path):
  """CPAL on someone else's SIPE network: refresh_bank fills the bank from the training split with
  the file's weights, then PACAM is read."""
  _, d, _ = converted
  _voc_tree(tmp_path / "VOC2012")
  c = _config(tmp_path / "VOC2012", d / "sipe.npz", method="cpal")
  c.method.cpal.refresh_bank = True
  c.method.cpal.num_clusters = 2
  c.cam.scales = (1.0,)
  summary = cli.run(c, str(tmp_path / "run"))
  assert summary["make_cam"]["written"] == len(IMAGES)
  peaks = []
  for image_id in IMAGES:
    m = infer_cam.load_maps(paths.cam_map(str(tmp_path / "run"), image_id))
    assert np.isfinite(m["high_res"]).all()
    peaks.append(m["high_res"].max())
  # As in the SIPE read, the first image's seeds go to classes it lacks: Eq. 4's mask is empty there.
  assert sum(p > 0.99 for p in peaks) >= 2, peaks
