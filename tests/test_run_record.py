"""The workdir's record: config.json and runs.jsonl change only when a run is accepted; a refused
resume leaves them byte-identical and fails before any stage runs."""

import json
import os

import pytest

from cpal_jax import paths
from cpal_jax import stages as cli
from test_train import tiny_config


def test_refused_resume_keeps_the_record(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config(**{"train.num_steps": 2, "stages": "train_cam"})
  cli.run(config, workdir)
  with open(paths.runs_jsonl(workdir)) as f:
    first = [json.loads(line) for line in f]
  assert len(first) == 1 and first[0]["status"] == "ok" and first[0]["stages"] == ["train_cam"]
  assert len(first[0]["config_hash"]) == 16
  record = {p: open(p, "rb").read() for p in (paths.config_json(workdir), paths.runs_jsonl(workdir))}
  summary = open(paths.summary_json(workdir), "rb").read()

  for change in ({"train.batch_size": 4}, {"method.name": "cpal"}):
    with pytest.raises(ValueError, match=f"{next(iter(change))}: checkpoint"):
      cli.run(tiny_config(**{"train.num_steps": 2, "stages": "train_cam", **change}), workdir)
    assert {p: open(p, "rb").read() for p in record} == record
    assert open(paths.summary_json(workdir), "rb").read() == summary

  # make_cam alone on a workdir whose maps were read another way is refused up front too.
  cli.run(tiny_config(**{"train.num_steps": 2, "stages": "make_cam"}), workdir)
  record = {p: open(p, "rb").read() for p in record}
  with pytest.raises(ValueError, match="cam.scales|scales"):
    cli.run(tiny_config(**{"train.num_steps": 2, "stages": "make_cam", "cam.scales": (1.0,)}), workdir)
  assert {p: open(p, "rb").read() for p in record} == record
  with open(paths.runs_jsonl(workdir)) as f:
    assert [json.loads(line)["status"] for line in f] == ["ok", "ok"]


def test_a_failed_run_is_recorded_with_its_status(tmp_path, monkeypatch):
  from cpal_jax.train import cam as cam_stage

  def boom(config, workdir):
    raise RuntimeError("disk on fire")

  monkeypatch.setattr(cam_stage, "train", boom)
  with pytest.raises(RuntimeError):
    cli.run(tiny_config(**{"train.num_steps": 2, "stages": "train_cam"}), str(tmp_path))
  with open(paths.runs_jsonl(str(tmp_path))) as f:
    (entry,) = [json.loads(line) for line in f]
  assert entry["status"] == "error: RuntimeError" and entry["ended"] >= entry["started"]
  assert os.path.exists(paths.config_json(str(tmp_path)))


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  cli.run(tiny_config(**{"train.num_steps": 2, "stages": "train_cam", "dry_run": True}), workdir)
  out = capsys.readouterr().out
  assert "1/1 train_cam: starts from step 0" in out and "accepted: nothing was run" in out
  assert not os.path.exists(workdir)
  cli.run(tiny_config(**{"train.num_steps": 2, "stages": "train_cam"}), workdir)
  before = {p: open(p, "rb").read() for p in (paths.config_json(workdir), paths.runs_jsonl(workdir))}
  capsys.readouterr()
  dry = tiny_config(**{"train.num_steps": 2, "stages": "train_cam,make_cam", "dry_run": True, "train.batch_size": 4})
  cli.run(dry, workdir)
  out = capsys.readouterr().out
  assert "train_cam: resumes from the checkpoint of step 2" in out and "2/2 make_cam: 0 maps exist" in out
  assert "refused: the checkpoint in" in out and "train.batch_size: checkpoint 8 vs config 4" in out
  assert {p: open(p, "rb").read() for p in before} == before


def test_deleted_outputs_take_their_figures_with_them(tmp_path):
  import shutil

  workdir = str(tmp_path)
  cli.run(tiny_config(**{"train.num_steps": 2, "stages": "train_cam,make_cam,eval_cam"}), workdir)
  summary = json.load(open(paths.summary_json(workdir)))
  assert summary["seed_miou"] is not None and "make_cam" in summary and "train_cam" in summary
  assert sorted(os.listdir(paths.stage_records(workdir))) == ["eval_cam.json", "make_cam.json", "train_cam.json"]
  shutil.rmtree(paths.cam_maps(workdir))
  cli.run(tiny_config(**{"train.num_steps": 2, "stages": "train_cam"}), workdir)  # nothing left to train
  summary = json.load(open(paths.summary_json(workdir)))
  assert summary["seed_miou"] is None and "make_cam" not in summary and "eval_cam" not in summary
  assert summary["train_cam"]["steps"] == 2
  assert "| `eval_cam` |" not in open(paths.summary_md(workdir)).read()


def test_config_hash_names_what_is_computed_not_how_it_was_launched():
  base = tiny_config()
  launched = tiny_config(**{"distributed.coordinator": "127.0.0.1:41234", "distributed.process_id": 1})
  assert cli.config_hash(launched) == cli.config_hash(base)
  assert cli.config_hash(tiny_config(**{"train.batch_size": 4})) != cli.config_hash(base)


def test_rebuild_skips_another_process_s_half_written_record(tmp_path):
  """On a pod, process 0 writes a stage record (a hidden temporary, then a rename) while another
  process rebuilds summary.json from the same folder: the temporary is not a record."""
  from cpal_jax import run_record

  workdir = str(tmp_path)
  os.makedirs(paths.cam_maps(workdir))
  open(os.path.join(paths.cam_maps(workdir), "a.npz"), "w").close()
  run_record.record(workdir, 1, "make_cam", [paths.cam_maps(workdir)], {"make_cam": {"written": 1}})
  with open(os.path.join(paths.stage_records(workdir), ".tmp-x1y2refine.json"), "w") as f:
    f.write('{"order": 3, "outp')  # cut off mid-write
  summary = run_record.rebuild(workdir)
  assert summary["make_cam"] == {"written": 1} and "refine" not in summary
