"""Preflight: each bad value, file or stage order found before anything runs, one line naming the
key or file and the fix; all of them together through the command line, exit 2, nothing written."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import synthetic as synthetic_config
import voc as voc_config
from cpal_jax import preflight

REPO = Path(__file__).resolve().parents[1]
ALL = ["train_cam", "make_cam", "eval_cam", "refine", "export", "train_seg", "eval_seg"]


def with_(config, **overrides):
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    with c.unlocked():
      node[last] = value
  return c


CASES = [
    ({"train.batch_size": 0}, "train.batch_size=0: must be positive"),
    ({"train.batch_size": -4}, "train.batch_size=-4: must be positive"),
    ({"train.num_steps": -5}, "train.num_steps=-5: must be 0 or more"),
    ({"train.num_steps": 0, "train.epochs": 0}, "train.num_steps and train.epochs are both 0"),
    ({"model.strides": (2, 2, 1)}, "model.strides=(2, 2, 1): 4 strides"),
    ({"refine.irn.strides": (1, 2, 2, 1)}, "refine.irn.strides=(1, 2, 2, 1): 4 strides of 1 or 2"),
    ({"model.dilations": (1, 1, 0, 1)}, "model.dilations=(1, 1, 0, 1): 4 positive ints"),
    ({"cam.scales": ()}, "cam.scales=(): one or more positive numbers"),
    ({"seg.eval.scales": (1.0, -0.5)}, "seg.eval.scales=(1.0, -0.5)"),
    ({"refine.mode": "dcrf"}, "refine.mode='dcrf': choose one of irn, ir_label, crf"),
    ({"method.name": "seam"}, "method.name='seam': choose one of"),
    ({"method.cpal.positiveness_metric": "l3"}, "method.cpal.positiveness_metric='l3'"),
    ({"data.name": "ade20k"}, "data.name='ade20k': choose one of synthetic, voc, coco"),
    ({"data.world": "mars"}, "data.world='mars'"),
    ({"model.backbone": "resnet18"}, "model.backbone='resnet18'"),
    ({"cam.flip_fusion": "both"}, "cam.flip_fusion='both'"),
    ({"export.source": "crf"}, "export.source='crf'"),
    ({"seg.layout": "timm"}, "seg.layout='timm'"),
    ({"train.nonfinite": "ignore"}, "train.nonfinite='ignore'"),
    ({"refine.irn.crop_size": 98}, "refine.irn.crop_size=98: a multiple of 4"),
    ({"refine.walk.radius": 0}, "refine.walk.radius=0: must be positive"),
    ({"model.pretrained": "/no/such/weights.npz"}, "model.pretrained=/no/such/weights.npz: no such file"),
    ({"cam.weights": "/no/net.npz"}, "cam.weights=/no/net.npz: no such file"),
    ({"data.tfds_dir": "/no/tfds"}, "data.tfds_dir=/no/tfds: no such folder"),
    ({"mesh.data": 64}, "mesh.data=64: only"),
]


@pytest.mark.parametrize("overrides,line", CASES, ids=[next(iter(o)) for o, _ in CASES])
def test_each_problem_names_its_key(overrides, line, tmp_path):
  found = preflight.problems(with_(synthetic_config.get_config(), **overrides), ALL, str(tmp_path))
  assert any(line in p for p in found), found
  assert all("\n" not in p for p in found)


def test_the_default_configs_pass(tmp_path):
  assert preflight.problems(synthetic_config.get_config(), ALL, str(tmp_path)) == []
  root = tmp_path / "VOC2012"
  root.mkdir()
  voc = with_(voc_config.get_config(), **{"mesh.data": 1})  # DeepLab's batch 10 on one device
  # An empty folder: the config is fine, the tree is not (each split the stages read says so).
  found = preflight.problems(with_(voc, **{"data.root": str(root)}), ALL, str(tmp_path))
  assert found and all(p.startswith("VOC root has no JPEGImages/") for p in found), found
  assert preflight.problems(voc, ALL, str(tmp_path)) == [
      "data.root is empty: set --config.data.root to the VOC folder"
  ]


def test_stage_order_against_the_workdir(tmp_path):
  c = synthetic_config.get_config()
  found = preflight.problems(c, ["eval_cam", "refine", "train_seg", "eval_seg"], str(tmp_path))
  # eval_seg reads train_seg's checkpoint, which this run makes first.
  assert [p.split(":")[1].split()[0] for p in found] == ["eval_cam", "refine", "train_seg"]
  assert "add make_cam before it" in found[0]
  # What an earlier requested stage writes counts, and so does what the workdir holds.
  assert preflight.problems(c, ["make_cam", "eval_cam"], str(tmp_path)) == [
      f"config.stages: make_cam reads what train_cam writes, and {tmp_path} has none of it; "
      "add train_cam before it (or run it first)"
  ]
  (tmp_path / "cam" / "ckpt" / "1200").mkdir(parents=True)
  assert preflight.problems(c, ["make_cam", "eval_cam"], str(tmp_path)) == []


def test_batches_must_split_over_the_devices(tmp_path):
  c = with_(synthetic_config.get_config(), **{"mesh.data": 8, "train.batch_size": 12, "seg.batch_size": 20})
  found = preflight.problems(c, ALL, str(tmp_path))
  assert "train.batch_size=12: must be divisible by the 8 devices of the data axis (mesh.data)" in found
  assert any(p.startswith("seg.batch_size=20") for p in found)
  assert not any(p.startswith("seg.batch_size") for p in preflight.problems(c, ["train_cam"], str(tmp_path)))


def test_command_line_reports_all_problems_in_seconds_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text("{}\n")
  (workdir / "runs.jsonl").write_text('{"status": "ok"}\n')
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  t0 = time.time()
  r = subprocess.run(
      [
          sys.executable, "-m", "cpal_jax.main", f"--workdir={workdir}",
          "--config.train.batch_size=0", "--config.refine.mode=dcrf", "--config.cam.scales=()",
          "--config.model.strides=(2,2,1)", "--config.seg.pretrained=/no/w.npz",
      ],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120,
  )
  assert r.returncode == 2 and time.time() - t0 < 30
  assert "Traceback" not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  for key in ("train.batch_size", "refine.mode", "cam.scales", "model.strides", "seg.pretrained"):
    assert sum(key in e for e in errors) == 1, (key, errors)
  assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


ASSET = REPO / "cpal_jax" / "assets" / "procnet_resnet_tiny.npz"


def test_weight_files_are_checked_against_the_model_from_their_headers(tmp_path):
  import numpy as np
  from safetensors.numpy import save_file

  from cpal_jax.models import pretrained

  c = synthetic_config.get_config()
  assert Path(c.model.pretrained) == ASSET
  # The shipped backbone fits; its header shapes are the tensors' shapes (.npz and .safetensors).
  flat = pretrained.read_flat(str(ASSET))
  assert pretrained.file_shapes(str(ASSET)) == {k: v.shape for k, v in flat.items()}
  save_file(flat, str(tmp_path / "w.safetensors"))
  assert pretrained.file_shapes(str(tmp_path / "w.safetensors")) == pretrained.file_shapes(str(ASSET))
  # Another backbone's weights: every stage that loads them says so, at most 4 lines each.
  small = with_(c, **{"model.backbone": "resnet_small", "refine.irn.backbone": "resnet_small"})
  found = preflight.problems(small, ALL, str(tmp_path))
  assert any(f.startswith(f"model.pretrained={ASSET}: 'params/") and "the model expects" in f for f in found), found
  assert any(f.startswith("refine.irn.pretrained=") for f in found), found
  assert sum(f.startswith("model.pretrained=") for f in found) <= 4
  # A backbone where a whole network is needed; a file that is not a weight file.
  whole = preflight.problems(with_(c, **{"cam.weights": str(ASSET)}), ["make_cam"], str(tmp_path))
  assert len(whole) == 1 and "holds 85 of the network's" in whole[0] and "not a backbone" in whole[0], whole
  (tmp_path / "bad.npz").write_text("not a zip")
  bad = preflight.problems(with_(c, **{"seg.pretrained": str(tmp_path / "bad.npz")}), ALL, str(tmp_path))
  assert bad == [f"seg.pretrained={tmp_path / 'bad.npz'}: not a readable weight file (BadZipFile: File is not a zip file)"]
  # A tensor the model has not.
  np.savez(tmp_path / "extra.npz", **{"params/layer9_0/conv1/kernel": np.zeros((3, 3, 1, 1), np.float32)})
  extra = preflight.problems(with_(c, **{"model.pretrained": str(tmp_path / "extra.npz")}), ["train_cam"], str(tmp_path))
  assert len(extra) == 1 and "has no place in the model" in extra[0], extra


def test_free_disk_is_checked_against_what_the_run_writes(tmp_path, monkeypatch):
  from cpal_jax import diskspace

  c = synthetic_config.get_config()
  assert preflight.problems(c, ALL, str(tmp_path)) == []
  monkeypatch.setattr(diskspace, "free_bytes", lambda path: 10 * 2**20)  # 10 MB
  found = preflight.problems(c, ALL, str(tmp_path / "run"))
  assert len(found) == 1 and found[0].startswith(f"--workdir={tmp_path / 'run'}: the run writes about "), found
  assert "1600 images' maps and labels" in found[0] and "10.0 MB free there" in found[0]
  # Evaluation alone writes nothing of that size.
  (tmp_path / "run" / "cam" / "maps").mkdir(parents=True)
  (tmp_path / "run" / "cam" / "maps" / "x.npz").write_bytes(b"")
  assert preflight.problems(c, ["eval_cam"], str(tmp_path / "run")) == []


def test_voc_tree_problems_are_found_from_headers(tmp_path):
  """Missing files and a mask of another size in the real VOC sample, found before any stage."""
  import shutil

  from PIL import Image

  root = tmp_path / "VOC2012"
  shutil.copytree(REPO / "tests" / "data" / "voc2012_sample", root)
  c = with_(
      voc_config.get_config(),
      **{"data.root": str(root), "data.train_split": "train", "data.eval_split": "train", "mesh.data": 1},
  )
  assert preflight.problems(c, ALL, str(tmp_path / "run")) == []
  ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
  mask = root / "SegmentationClass" / f"{ids[1]}.png"
  with Image.open(mask) as m:
    m.resize((m.size[0] // 2, m.size[1] // 2), Image.NEAREST).save(mask)
  found = preflight.problems(c, ALL, str(tmp_path / "run"))
  assert len(found) == 1 and found[0].startswith(f"VOC mask {mask} is ") and "but its image is" in found[0]
  (root / "JPEGImages" / f"{ids[0]}.jpg").unlink()
  found = preflight.problems(c, ["train_cam"], str(tmp_path / "run"))
  assert len(found) == 1 and "VOC image missing for 1 of" in found[0] and ids[0] in found[0]


def _cli_value(value) -> str:
  if isinstance(value, tuple):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


CLI_EXTRA = [
    (["--config.stages=eval_cam"], "config.stages: eval_cam reads what make_cam writes"),
    (["--config.stages=train_cam,bogus"], "config.stages='train_cam,bogus': unknown stage(s)"),
    (["--config=synthetic:bogus"], "no variant 'bogus'"),
    (["--config=nothere.py"], "no such config file"),
    (["--config.train.batch_size=sixteen"], "sixteen"),
    (["--config.train.bogus_key=3"], "bogus_key"),
    (["--config=voc"], "data.root is empty"),
    (["--config=voc", "--config.data.root=/no/voc"], "data.root=/no/voc: no such folder"),
    (["--config.model.backbone=resnet_small"], "model.pretrained="),
]


@pytest.mark.slow
def test_bad_input_matrix_through_the_command_line(tmp_path):
  """Every case: non-zero exit before any training, no traceback, the key or file named, and the
  workdir's record byte-identical."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"seed": 0}\n')
  (workdir / "runs.jsonl").write_text('{"status": "ok"}\n')
  (workdir / "summary.json").write_text('{"seed_miou": 50.0}\n')
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  cases = [
      ([f"--config.{k}={_cli_value(v)}" for k, v in overrides.items()], line) for overrides, line in CASES
  ] + CLI_EXTRA
  assert len(cases) >= 30
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  for args, says in cases:
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "cpal_jax.main", f"--workdir={workdir}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    took = time.time() - t0
    assert r.returncode != 0, args
    assert says in r.stderr, (args, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    assert took < 30, (args, took)
    assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before, args
