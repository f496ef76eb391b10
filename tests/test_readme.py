"""The docs' code stays true: the CPAL (README) and PPC (docs/method.md) plug-in examples run as written."""

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_block(marker: str, doc: str = "README.md") -> dict:
  """Executes the python block after `<!-- {marker} -->` in `doc`; returns its globals."""
  match = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", (ROOT / doc).read_text(), re.S)
  assert match, f"the {marker} block is missing from {doc}"
  scope = {}
  exec(compile(match.group(1), f"README {marker}", "exec"), scope)
  return scope


@pytest.mark.slow
def test_plug_in_example_runs():
  scope = run_block("plug-in example")
  state, seed = scope["state"], scope["seed"]
  assert int(state.bank.count.sum()) > 0  # prototypes went into the banks
  assert bool(state.ready.any())  # k-means ran on them
  assert seed.shape == (4, 16, 16) and np.isfinite(float(scope["loss"]))


@pytest.mark.slow
def test_ppc_plug_in_example_runs():
  scope = run_block("ppc plug-in example", "docs/method.md")
  terms = scope["terms"]
  assert set(terms) == {"ppc_cross_proto", "ppc_cross_label", "ppc_intra", "ppc_nce"}
  assert all(np.isfinite(float(v)) for v in terms.values()) and float(terms["ppc_nce"]) > 0
  assert np.isfinite(float(scope["loss"]))
