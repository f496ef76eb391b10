"""The installable package: pyproject's pins equal requirements.txt's, configs resolve by name from
any folder, and (slow) `pip install .` gives a `cpal-jax` command that runs the smoke config from
another folder."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cpal_jax import command, config_files

REPO = Path(__file__).resolve().parents[1]


def pins(path: Path) -> list[str]:
  lines = [l.split("#")[0].strip() for l in path.read_text().splitlines()]
  return [l for l in lines if l and not l.startswith("-r")]


def test_pyproject_pins_are_requirements_txt():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  assert project["dependencies"] == pins(REPO / "requirements.txt")
  assert project["optional-dependencies"]["tfds"] == pins(REPO / "requirements-tfds.txt")
  assert project["scripts"]["cpal-jax"] == "cpal_jax.main:cli"


def test_config_names_resolve_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  voc = str(REPO / "configs" / "voc.py")
  assert config_files.config_file("voc") == voc
  assert config_files.config_file("voc.py:seg") == voc + ":seg"
  assert config_files.config_file("configs/voc.py:seg") == voc + ":seg"  # not here: the shipped one
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "voc.py").write_text("")
  assert config_files.config_file("configs/voc.py") == "configs/voc.py"  # a local file wins
  assert config_files.config_file("nope.py") == "nope.py"  # left for ml_collections to report
  argv = command.resolve_config_argv(["prog", "--config=synthetic:smoke", "--config.seed=1"])
  assert argv == ["prog", f"--config={REPO / 'configs' / 'synthetic.py'}:smoke", "--config.seed=1"]


def test_smoke_variant_is_small():
  import synthetic as synthetic_config

  smoke = synthetic_config.get_config("smoke")
  assert smoke.data.num_train <= 64 and smoke.train.num_steps <= 20 and smoke.seg.num_steps <= 10
  assert smoke.stages == synthetic_config.get_config().stages  # every stage


def test_help_lists_every_key_of_the_named_config():
  from cpal_jax import config_doc

  def helped(*args):
    r = subprocess.run(
        [sys.executable, "-m", "cpal_jax.main", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return r.stdout

  voc = helped("--config=voc:seg", "--help")
  keys = config_doc._flat(config_files.load("voc:seg").to_dict())
  listed = {l.split()[0] for l in voc.splitlines() if l.startswith("  ") and not l.lstrip().startswith("-")}
  assert listed >= set(keys)
  seg_lr = next(l for l in voc.splitlines() if l.split()[:1] == ["seg.lr"])
  assert "0.00025" in seg_lr and "backbone" in seg_lr  # the voc:seg value and its meaning
  assert "--workdir" in voc
  synthetic = helped("-h")  # the default config
  assert any(l.split()[:2] == ["model.backbone", "'resnet_tiny'"] for l in synthetic.splitlines())


@pytest.mark.slow
def test_pip_install_gives_a_cpal_jax_command(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  py = venv / "bin" / "python"
  # The pinned dependencies come from this environment (no download); the package itself is built
  # and installed from the checkout as a user's `pip install .` does.
  site = subprocess.run(
      [str(py), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True
  ).stdout.strip()
  here = [p for p in sys.path if p.endswith("site-packages")][0]
  Path(site, "deps.pth").write_text(here + "\n")
  subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(REPO)], check=True, timeout=600)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env["JAX_PLATFORMS"] = "cpu"
  r = subprocess.run(
      [str(venv / "bin" / "cpal-jax"), "--config=configs/synthetic.py:smoke", "--workdir=run"],
      cwd=elsewhere,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  summary = (elsewhere / "run" / "summary.json").read_text()
  assert '"seg_val_miou"' in summary and (elsewhere / "run" / "masks").is_dir()
  # The installed copy ran, not the checkout.
  origin = subprocess.run(
      [str(py), "-c", "import cpal_jax; print(cpal_jax.__file__)"], cwd=elsewhere, env=env,
      capture_output=True, text=True, check=True,
  ).stdout
  assert str(venv) in origin
