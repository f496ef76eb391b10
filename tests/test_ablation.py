import json

import numpy as np
import pytest

from cpal_jax import ablation
from cpal_jax import stages as cli
from test_train import tiny_config


def test_every_row_resolves_to_a_valid_config():
  base = tiny_config()
  for table, rows in ablation.TABLES.items():
    for rid, _, _, overrides in rows:
      c = ablation.row_config(base, overrides, seed=3)
      assert c.seed == 3 and c.method.name in ("cam", "sipe", "cpal", "ppc"), (table, rid)
      for key, value in overrides.items():
        node = c
        for part in key.split("."):
          node = node[part]
        assert node == value, (table, rid, key)


def test_table1_rows_differ_as_the_paper_adds_components():
  rows = {rid: o for rid, _, _, o in ablation.TABLES["1"]}
  assert rows["II"]["method.cpal.top_k"] == 0 and not rows["II"]["method.cpal.positiveness"]
  assert "method.cpal.top_k" not in rows["III"] and not rows["III"]["method.cpal.fda"]
  assert rows["IV"] == {"method.name": "cpal", "method.cpal.self_loss": False, "method.cpal.keep_sipe_gsc": True}
  assert rows["V"] == {"method.name": "cpal"}
  # Without L_self, SIPE's L_GSC trains the side heads of rows II-IV, as in the base network.
  for rid in ("II", "III", "IV"):
    assert rows[rid]["method.cpal.keep_sipe_gsc"] and not rows[rid]["method.cpal.self_loss"], rid


def test_table4_sets_the_regularisers_side_by_side():
  rows = {rid: (paper, o) for rid, _, paper, o in ablation.TABLES["4"]}
  assert rows["PPC"] == (61.5, {"method.name": "ppc"})
  assert rows["SIPE"][1] == {"method.name": "sipe"} and rows["CPAL"][1] == {"method.name": "cpal"}


def test_summarize_mean_and_std_in_the_docs_form():
  md, rows = ablation.summarize(
      "3",
      {"dot": [{"seed_miou": 40.0}, {"seed_miou": 44.0}], "l1": [{"seed_miou": 30.0}]},
      [3, 4],
      "python -m cpal_jax.ablation --table=3 --seeds=3,4",
  )
  by = {r["row"]: r for r in rows}
  assert by["dot"]["mean"] == 42.0 and by["dot"]["std"] == pytest.approx(np.std([40, 44], ddof=1))
  assert by["l1"]["std"] == 0.0 and "cos" not in by
  lines = md.splitlines()
  assert lines[0].startswith("`python -m cpal_jax.ablation --table=3 --seeds=3,4` (table at ")
  assert "| row | setting | seed mIoU, seeds 3, 4 | paper (VOC train) |" in lines
  assert "| dot | positiveness metric dot | 42.00 +- 2.83 (40.00, 44.00) | 62.5 |" in lines


def test_summarize_threshold_rows_show_fixed_and_oracle():
  runs = [
      {
          "seed_miou": 45.0,
          "seed_miou_fixed_threshold": {"t": 0.15, "miou": 36.0},
          "thresholds": {"seed": 0.44},
      },
      {
          "seed_miou": 47.0,
          "seed_miou_fixed_threshold": {"t": 0.15, "miou": 38.0},
          "thresholds": {"seed": 0.40},
      },
  ]
  md, rows = ablation.summarize("1", {"I": runs, "V": [{"seed_miou": 50.0}, {"seed_miou": 52.0}]}, [0, 1])
  assert rows[0]["fixed_threshold_miou"] == [36.0, 38.0] and rows[0]["oracle_thresholds"] == [0.44, 0.40]
  assert "| 46.00 +- 1.41 (45.00, 47.00) | 37.00 +- 1.41 | 0.44, 0.40 | 50.1 |" in md
  assert "| 51.00 +- 1.41 (50.00, 52.00) | - | - | 62.5 |" in md  # argmax rows: no threshold


def test_git_commit_names_this_checkout():
  from cpal_jax import provenance

  commit = provenance.git_commit()
  assert commit == "unknown" or len(commit.split("+")[0]) >= 7


@pytest.mark.slow
def test_runs_rows_and_does_not_redo_finished_runs(tmp_path, monkeypatch):
  base = tiny_config(**{"method.cpal.capacity": 16, "method.cpal.num_clusters": 4, "method.cpal.top_k": 2})
  base.train.num_steps = 8  # two epochs of 4 steps: k-means runs once, L_self is on for epoch 2
  results = ablation.run_table(base, "1", [0], str(tmp_path), rows=["I", "V"])
  assert set(results) == {"I", "V"} and all(np.isfinite(v[0]["seed_miou"]) for v in results.values())
  with open(tmp_path / "table1.json") as f:
    rows = json.load(f)
  assert [r["row"] for r in rows] == ["I", "V"]
  summary_v = json.load(open(tmp_path / "table1" / "V" / "seed0" / "summary.json"))
  assert summary_v["train_cam"]["bank/ready_classes"] > 0  # CPAL really clustered its banks

  def fail(*a, **k):
    raise AssertionError("a finished run was started again")

  monkeypatch.setattr(cli, "run", fail)
  again = ablation.run_table(base, "1", [0], str(tmp_path), rows=["I", "V"])
  assert again == results
