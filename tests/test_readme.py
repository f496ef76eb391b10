"""README's code stays true: the CPAL and PPC plug-in examples run as written."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_plug_in_example_runs():
  text = README.read_text()
  match = re.search(r"<!-- plug-in example -->\n```python\n(.*?)```", text, re.S)
  assert match, "the plug-in example block is missing from README.md"
  scope = {}
  exec(compile(match.group(1), "README plug-in example", "exec"), scope)
  state, seed = scope["state"], scope["seed"]
  assert int(state.bank.count.sum()) > 0  # prototypes went into the banks
  assert bool(state.ready.any())  # k-means ran on them
  assert seed.shape == (4, 16, 16) and np.isfinite(float(scope["loss"]))


@pytest.mark.slow
def test_ppc_plug_in_example_runs():
  text = README.read_text()
  match = re.search(r"<!-- ppc plug-in example -->\n```python\n(.*?)```", text, re.S)
  assert match, "the PPC plug-in example block is missing from README.md"
  scope = {}
  exec(compile(match.group(1), "README PPC plug-in example", "exec"), scope)
  terms = scope["terms"]
  assert set(terms) == {"ppc_cross_proto", "ppc_cross_label", "ppc_intra", "ppc_nce"}
  assert all(np.isfinite(float(v)) for v in terms.values()) and float(terms["ppc_nce"]) > 0
  assert np.isfinite(float(scope["loss"]))
