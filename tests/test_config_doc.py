"""docs/config.md is what `python -m cpal_jax.config_doc` prints now, and every key has a meaning."""

from pathlib import Path

from cpal_jax import config_doc, defaults

REPO = Path(__file__).resolve().parents[1]


def test_docs_config_md_is_current():
  assert (REPO / "docs" / "config.md").read_text() == config_doc.render(), (
      "docs/config.md is stale: python -m cpal_jax.config_doc > docs/config.md"
  )


def test_every_key_is_listed_with_a_meaning():
  rows = [l for l in config_doc.render().splitlines() if l.startswith("| `")]
  keys = {r.split("`")[1] for r in rows}
  assert keys == set(config_doc._flat(defaults.base().to_dict()))
  assert all(r.rstrip(" |").split("|")[-1].strip() for r in rows), [r for r in rows if r.endswith("|  |")]
