"""README's code stays true: the plug-in example runs as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


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
