"""cpal_jax command line: runs the configured stages in order on one workdir.

  python -m cpal_jax.main                                    # embedded synthetic default
  python -m cpal_jax.main --config=configs/voc.py --config.data.root=/data/VOCdevkit/VOC2012
  python -m cpal_jax.main --config=configs/voc.py --config.stages=eval_cam --workdir=runs/voc

Every stage reads only what earlier stages wrote to the workdir, so any suffix can be re-run
(cpal_jax/stages.py runs them).
"""

import os
import sys
import traceback

from absl import app, flags

from cpal_jax import command, stages


def cli() -> None:
  config_flag = command.define_config_flag("Pipeline config file (get_config()).")
  workdir_flag = flags.DEFINE_string("workdir", None, "Run directory; overrides config.workdir.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(
          f"unexpected arguments {argv[1:]}; options are --config, --config.<key>=value, --workdir"
      )
    if flags.FLAGS["workdir"].present and not workdir_flag.value:
      raise app.UsageError("--workdir is empty; name a folder, or leave the flag out for config.workdir")
    command.setup_logging()
    config = config_flag.value
    with command.user_errors_in_one_line(config.get("debug", False)), stages.exit_on_preemption():
      stages.run(config, workdir_flag.value or config.workdir or os.path.join("runs", "default"))

  try:
    command.run(main, __doc__)
  except SystemExit as e:
    if _one_of_several():
      _distributed().leave_on_failure(e.code)
    raise
  except BaseException:
    if _one_of_several():
      traceback.print_exc()
      _distributed().leave_on_failure(1)
    raise


def _one_of_several() -> bool:
  # Only a run that got as far as JAX can have initialised the distributed runtime.
  return "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized()


def _distributed():
  from cpal_jax.parallel import distributed

  return distributed


if __name__ == "__main__":
  cli()
