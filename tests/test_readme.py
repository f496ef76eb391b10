"""README's code stays true: the CPAL and PPC plug-in examples run as written."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def run_block(marker: str) -> dict:
  """Executes README's python block after `<!-- {marker} -->`; returns its globals."""
  match = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", README.read_text(), re.S)
  assert match, f"the {marker} block is missing from README.md"
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
  scope = run_block("ppc plug-in example")
  terms = scope["terms"]
  assert set(terms) == {"ppc_cross_proto", "ppc_cross_label", "ppc_intra", "ppc_nce"}
  assert all(np.isfinite(float(v)) for v in terms.values()) and float(terms["ppc_nce"]) > 0
  assert np.isfinite(float(scope["loss"]))
