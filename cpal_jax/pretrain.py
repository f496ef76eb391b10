"""Pretrains the CPU backbone on ProcNet and writes weights that model.pretrained loads.

  python -m cpal_jax.pretrain                                  # configs/pretrain.py
  python -m cpal_jax.pretrain --config.train.epochs=1 --config.out=/tmp/w.npz --workdir=/tmp/pt

A killed run resumes from its workdir's checkpoint.
"""


from absl import app, flags

from cpal_jax import command, stages


def cli() -> None:
  config_flag = command.define_config_flag("Pretraining config file.", "pretrain.py")
  workdir_flag = flags.DEFINE_string("workdir", None, "Run directory (checkpoints); overrides config.workdir.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config, --config.<key>=value, --workdir")
    command.setup_logging()
    from cpal_jax.train import pretrain

    config = config_flag.value
    with command.user_errors_in_one_line(), stages.exit_on_preemption():
      record = pretrain.train(config, workdir_flag.value or config.workdir)
    print(f"val accuracy {record['val_accuracy']:.4f} (chance {record['chance']:.4f}) in {record['seconds']:.0f} s; "
          f"weights: {config.out}")

  command.run(main, __doc__)


if __name__ == "__main__":
  cli()
