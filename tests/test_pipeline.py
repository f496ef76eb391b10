"""The training iterator: worker processes change nothing, drop_last per epoch, per-process shards."""

import numpy as np
import pytest
from absl import flags

from cpal_jax.data import pipeline
from test_train import tiny_config


def _batches(config, n, **kw):
  source = pipeline.make_source(config, config.data.train_split)
  schedule = pipeline.make_schedule(config.train, len(source))
  it = pipeline.train_iterator(config, source, schedule, **kw)
  out = [next(it) for _ in range(n)]
  it.close()
  return out


@pytest.fixture
def absl_flags_marked_parsed():
  """grain's worker processes read absl flags, which must look parsed; they are put back as found
  (unparsed, at their defaults) afterwards, so later tests do not see flags this test parsed."""
  was_parsed = flags.FLAGS.is_parsed()
  if not was_parsed:
    flags.FLAGS.mark_as_parsed()
  yield
  if not was_parsed:
    flags.FLAGS.unparse_flags()
  assert flags.FLAGS.is_parsed() == was_parsed


@pytest.mark.usefixtures("absl_flags_marked_parsed")
def test_worker_processes_give_the_same_batches():
  config = tiny_config()
  threads = _batches(config, 3)
  config.data.workers = 2
  workers = _batches(config, 3)
  for a, b in zip(threads, workers):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_drop_last_and_new_order_each_epoch():
  config = tiny_config(**{"data.num_train": 36})  # 36 images, batch 8: 4 batches, 4 dropped per epoch
  source = pipeline.make_source(config, "train")
  schedule = pipeline.make_schedule(config.train, len(source))
  assert schedule.steps_per_epoch == 4
  ds = pipeline.train_dataset(config, source, schedule)
  assert len(ds) == 2 * schedule.steps_per_epoch  # 6 steps reach into a second whole epoch
  stream = pipeline._DropLast(
      pipeline.grain.MapDataset.source(source).seed(config.seed).shuffle().repeat(2), len(source), 32
  )
  epoch0 = [stream[i]["id"] for i in range(32)]
  epoch1 = [stream[i]["id"] for i in range(32, 64)]
  assert len(set(epoch0)) == 32 and len(set(epoch1)) == 32 and epoch0 != epoch1


def test_processes_split_each_global_batch():
  config = tiny_config()
  whole = _batches(config, 2)
  parts = [_batches(config, 2, process_index=p, process_count=2) for p in range(2)]
  for step in range(2):
    for k in whole[step]:
      # Process blocks in process order: the single-process batch, in its order.
      merged = np.concatenate([parts[0][step][k], parts[1][step][k]])
      np.testing.assert_array_equal(merged, whole[step][k])


def test_batch_larger_than_the_data_is_an_error():
  config = tiny_config(**{"train.batch_size": 64})
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.make_schedule(config.train, 32)


def test_a_run_builds_each_split_source_once(monkeypatch, tmp_path):
  """Preflight, the resume checks and the stages share one source per split inside stages.run; a
  source built outside a run is built afresh (a data tree changed in between is seen)."""
  import synthetic as synthetic_config

  from cpal_jax import stages

  built = []
  build = pipeline._build_source
  monkeypatch.setattr(pipeline, "_build_source", lambda c, split, mask: built.append((split, mask)) or build(c, split, mask))
  config = synthetic_config.get_config("smoke")
  with config.unlocked():
    config.dry_run = True
  stages.run(config, str(tmp_path / "run"))
  assert built and len(built) == len(set(built)), built
  assert pipeline._SHARED is None
  first = pipeline.make_source(config, "train")
  assert pipeline.make_source(config, "train") is not first
  with pipeline.shared_sources():
    assert pipeline.make_source(config, "train") is pipeline.make_source(config, "train")
    with config.unlocked():
      config.seed = 1  # another draw of the synthetic data
    assert pipeline.make_source(config, "train").seed != first.seed
