"""Ablation runner: the rows of the CPAL paper's Tables 1-3 as config deltas, several seeds each;
table 4 sets the regularisers side by side on the same SIPE base (the paper's Table 4 methods).

  python -m cpal_jax.ablation --table=1 --seeds=0,1,2 --workdir=runs/ablation
  python -m cpal_jax.ablation --table=2 --config=configs/synthetic.py --config.train.epochs=6

Every (row, seed) is a normal pipeline run (train_cam, make_cam, eval_cam) in workdir/table<T>/<row>/seed<s>,
so an interrupted ablation resumes where it stopped and finished runs are not redone. Writes
table<T>.md and table<T>.json: seed mIoU mean +- std per row next to the paper's VOC figure.
"""

import json
import os
import sys

import numpy as np
from absl import app, flags

from cpal_jax import paths, provenance

# (row id, description, the paper's VOC seed mIoU, config overrides on top of the base config).
# Rows II-IV train without L_self, which is what trains the side heads behind F_hie (their inputs
# are detached): SIPE's L_GSC trains them instead, as in the base network, so every row reads
# trained features (like for like with the SIPE row) rather than a random projection.
_NO_SELF = {"method.cpal.self_loss": False, "method.cpal.keep_sipe_gsc": True}
_CPAL_OFF = {**_NO_SELF, "method.cpal.fda": False}
TABLES = {
    "1": [
        ("I", "vanilla CAM", 50.1, {"method.name": "cam"}),
        ("SIPE", "SIPE base (reference)", 58.6, {"method.name": "sipe"}),
        (
            "II",
            "+ plain context prototypes",
            51.2,
            {"method.name": "cpal", **_CPAL_OFF, "method.cpal.top_k": 0, "method.cpal.positiveness": False},
        ),
        ("III", "+ prototype awareness (top-K + positiveness)", 54.5, {"method.name": "cpal", **_CPAL_OFF}),
        ("IV", "+ feature alignment", 56.8, {"method.name": "cpal", **_NO_SELF}),
        ("V", "+ L_self (CPAL)", 62.5, {"method.name": "cpal"}),
    ],
    "2": [
        (
            "no-nb",
            "no neighbours, no positiveness (the image's own prototype, unshifted)",
            59.2,
            {"method.name": "cpal", "method.cpal.neighbours": False, "method.cpal.fda": False},
        ),
        (
            "nb-uniform-20",
            "neighbours K=20, uniform weights",
            60.3,
            {"method.name": "cpal", "method.cpal.positiveness": False},
        ),
        ("K10", "neighbours + positiveness, K=10", 61.3, {"method.name": "cpal", "method.cpal.top_k": 10}),
        ("K20", "neighbours + positiveness, K=20", 62.5, {"method.name": "cpal", "method.cpal.top_k": 20}),
        ("K50", "neighbours + positiveness, K=50", 60.1, {"method.name": "cpal", "method.cpal.top_k": 50}),
    ],
    "3": [
        (m, f"positiveness metric {m}", v, {"method.name": "cpal", "method.cpal.positiveness_metric": m})
        for m, v in (("l1", 59.6), ("l2", 58.7), ("cos", 61.9), ("dot", 62.5))
    ],
    # The paper's Table 4 seeds: SIPE 58.6, PPC 61.5 (on SEAM, with PCM; here on the SIPE network
    # without it, docs/method.md 4), IRN + CPAL 62.5.
    "4": [
        ("SIPE", "SIPE base", 58.6, {"method.name": "sipe"}),
        ("PPC", "SIPE base + PPC (paper: SEAM + PPC)", 61.5, {"method.name": "ppc"}),
        ("CPAL", "SIPE base + CPAL", 62.5, {"method.name": "cpal"}),
    ],
}


def row_config(base, overrides: dict, seed: int):
  c = base.copy_and_resolve_references()
  with c.unlocked():
    for key, value in overrides.items():
      node = c
      *path, last = key.split(".")
      for p in path:
        node = node[p]
      node[last] = value
    c.seed = seed
    c.stages = "train_cam,make_cam,eval_cam"
    c.cam.split = c.data.eval_split  # seeds are scored there; no pseudo masks needed
    c.report.enabled = False
  return c


def _mean_std(vals):
  return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def summarize(
    table: str, results: dict, seeds: list[int], command: str = "", run_commits: set | None = None
) -> tuple[str, list]:
  """results: row id -> list of per-seed summaries (summary.json dicts), in `seeds` order. Returns
  (markdown in docs/results.md's form: the command and commit, then one row per setting with the
  mean +- std and each seed's figure; rows).

  Rows scored by a background threshold (plain CAM) add the oracle sweep (t picked on ground truth)
  and IRN's fixed t=0.15 columns; argmax rows need no threshold.
  """
  rows = []
  for rid, desc, paper, _ in TABLES[table]:
    runs = results.get(rid)
    if not runs:
      continue
    vals = [r["seed_miou"] for r in runs]
    mean, std = _mean_std(vals)
    row = {"row": rid, "setting": desc, "seed_miou": vals, "mean": mean, "std": std, "paper_voc": paper}
    fixed = [r["seed_miou_fixed_threshold"]["miou"] for r in runs if r.get("seed_miou_fixed_threshold")]
    if fixed:
      row["fixed_threshold_miou"] = fixed
    oracle_t = [r["thresholds"]["seed"] for r in runs if (r.get("thresholds") or {}).get("seed") is not None]
    if oracle_t:
      row["oracle_thresholds"] = oracle_t
    rows.append(row)
  swept = any("oracle_thresholds" in r for r in rows)
  head = ["row", "setting", f"seed mIoU, seeds {', '.join(map(str, seeds))}"]
  head += ["fixed t=0.15", "oracle t"] if swept else []
  lines = [f"| {' | '.join(head + ['paper (VOC train)'])} |", "|" + " --- |" * (len(head) + 1)]
  for row in rows:
    each = ", ".join(f"{v:.2f}" for v in row["seed_miou"])
    cells = [row["row"], row["setting"], f"{row['mean']:.2f} +- {row['std']:.2f} ({each})"]
    if swept:
      fixed_txt = "-"
      if "fixed_threshold_miou" in row:
        fm, fs = _mean_std(row["fixed_threshold_miou"])
        fixed_txt = f"{fm:.2f} +- {fs:.2f}"
      cells += [fixed_txt, ", ".join(f"{t:.2f}" for t in row.get("oracle_thresholds", [])) or "-"]
    lines.append(f"| {' | '.join(cells + [str(row['paper_voc'])])} |")
  preface = []
  if command:
    ran = f"runs at {', '.join(sorted(run_commits))}, " if run_commits else ""
    preface = [f"`{command}` ({ran}table at {provenance.git_commit()}):", ""]
  return "\n".join(preface + lines) + "\n", rows


def _run_commits(run_dir: str) -> set:
  path = paths.runs_jsonl(run_dir)
  if not os.path.exists(path):
    return set()
  with open(path) as f:
    entries = [json.loads(line) for line in f if line.strip()]
  return {e["commit"] for e in entries if e.get("status") == "ok" and e.get("commit")}


def run_table(
    base, table: str, seeds: list[int], workdir: str, rows: list[str] | None = None, command: str = ""
) -> dict:
  from cpal_jax import run_record, stages

  results = {}  # row id -> per-seed summaries
  commits = set()  # of the code each run's last finished invocation ran (runs.jsonl)
  for rid, _, _, overrides in TABLES[table]:
    if rows and rid not in rows:
      continue
    for seed in seeds:
      run_dir = os.path.join(workdir, f"table{table}", rid, f"seed{seed}")
      done = run_record.read(run_dir)
      if done.get("seed_miou") is None or "eval_cam" not in (done.get("stage_seconds") or {}):
        done = stages.run(row_config(base, overrides, seed), run_dir)
      results.setdefault(rid, []).append(done)
      commits |= _run_commits(run_dir)
  md, json_rows = summarize(table, results, seeds, command, commits)
  paths.write_text(os.path.join(workdir, f"table{table}.md"), md)
  paths.write_text(
      os.path.join(workdir, f"table{table}.json"), json.dumps(json_rows, indent=2) + "\n"
  )
  print(md)
  return results


def cli() -> None:
  from cpal_jax import command, stages

  config_flag = command.define_config_flag("Base config of every row.")
  table = flags.DEFINE_enum("table", "1", sorted(TABLES), "Which of the paper's tables to reproduce.")
  seeds_flag = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
  rows_flag = flags.DEFINE_string("rows", "", "Comma-separated row ids (default: all rows of the table).")
  workdir = flags.DEFINE_string("workdir", "runs/ablation", "Root of the ablation runs.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    seeds = [int(s) for s in seeds_flag.value.split(",") if s.strip()]
    rows = [r for r in rows_flag.value.split(",") if r.strip()] or None
    unknown = set(rows or []) - {r[0] for r in TABLES[table.value]}
    if unknown:
      raise app.UsageError(f"unknown rows {sorted(unknown)} for table {table.value}")
    command.setup_logging()
    with command.user_errors_in_one_line(config_flag.value.get("debug", False)), stages.exit_on_preemption():
      command_line = " ".join(["python -m cpal_jax.ablation", *sys.argv[1:]])
      run_table(config_flag.value, table.value, seeds, workdir.value, rows, command_line)

  command.run(main, __doc__)


if __name__ == "__main__":
  cli()
