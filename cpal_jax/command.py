"""What every command-line program of the package shares: the --config flag and logging. Flags exist
only when a module runs as a program, so importing the library defines none."""

import contextlib
import logging
import os
import sys

from absl import logging as absl_logging
from ml_collections import config_flags

from cpal_jax import config_files

def setup_logging() -> None:
  # Our progress lines at INFO; the libraries' (orbax, absl, jax) only when something is wrong.
  absl_logging.set_verbosity(absl_logging.WARNING)
  pkg = logging.getLogger("cpal_jax")
  if not pkg.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    pkg.addHandler(handler)
  pkg.setLevel(logging.INFO)
  pkg.propagate = False


def _check_variant(value: str) -> None:
  """A missing config file or unknown `:variant` ends the program in one line, before flag parsing
  (which would wrap the config's own error in a traceback)."""
  path, _, variant = value.partition(":")
  if not os.path.isfile(path):
    names = ", ".join(config_files.shipped())
    print(f"error: --config={value}: no such config file; a path, or one of {names}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)
  variants = getattr(config_files.module(path), "VARIANTS", ("",))
  if variant not in variants:
    shown = ", ".join(f":{v}" for v in variants if v)
    print(f"error: --config={value}: no variant {variant!r}; this file has {shown or 'none'}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)


def resolve_config_argv(argv: list[str]) -> list[str]:
  """argv with --config=<value> resolved by config_file and checked (the other flags as they are)."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + config_files.config_file(arg[len("--config=") :])
      _check_variant(out[i][len("--config=") :])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = config_files.config_file(out[i + 1])
      _check_variant(out[i + 1])
  return out


# The running program's default config and the flags that existed before its own (for --help).
_PROGRAM: dict = {}
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort")


def define_config_flag(help_text: str, default: str = "synthetic.py"):
  """--config (flags exist only when a module runs as a program, so library imports stay clean).
  Programs start with run(main, __doc__), so packaged names work, flag errors are one line and
  --help lists every config key."""
  from absl import flags

  _PROGRAM.update(default=default, absl=set(flags.FLAGS))
  try:
    default_file = config_files.config_file(default)
    return config_flags.DEFINE_config_file("config", default_file, help_text, lock_config=True)
  except (AttributeError, KeyError) as e:  # ml_collections meets an unknown --config.<key> here
    name = str(e).strip("'\" ")
    given = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.") and name in a.split("=")[0]]
    print(f"error: {given[0] if given else name}: no such config key (docs/config.md lists them)", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)


def help_text(argv: list[str], doc: str) -> str:
  """The program's docstring, its own flags, and every key of the config it would load (the one
  --config names, else its default) with that config's value and meaning."""
  from absl import flags

  from cpal_jax import config_doc

  value = next((a[len("--config=") :] for a in argv if a.startswith("--config=")), None)
  if value is None and "--config" in argv[:-1]:
    value = argv[argv.index("--config") + 1]
  value = value or config_files.config_file(_PROGRAM.get("default", "synthetic.py"))
  lines = [(doc or "").strip(), "", "flags:"]
  own = set(flags.FLAGS) - _PROGRAM.get("absl", set()) - {"config"}
  for name in sorted(own, key=lambda n: n != "workdir"):
    flag = flags.FLAGS[name]
    default = "" if flag.default in (None, "") else f" (default: {flag.default_as_str})"
    lines.append(f"  --{name}: {flag.help}{default}")
  lines += [
      f"  --config=<file>[:variant]: the config file, a path or a packaged name (now: {value})",
      "  --config.<key>=<value>: set any key below; tuples as (1.0,0.5)",
      "",
      f"config keys, with the values of {value} (docs/config.md compares the shipped configs):",
      *config_doc.key_lines(config_files.load(value)),
  ]
  return "\n".join(lines)


def run(main, doc: str) -> None:
  """absl's app.run of `main` with --config resolved (packaged names, variants checked), one-line
  flag errors, and --help answered by help_text."""
  from absl import app

  argv = resolve_config_argv(sys.argv)
  if any(a in HELP_FLAGS for a in argv[1:]):
    try:
      print(help_text(argv, doc))
    except BrokenPipeError:  # `--help | head`
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  app.run(main, argv=argv, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with its errors (a wrong type, a bad value) as one `error:` line."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"error: {' '.join(lines[:1] + lines[-1:]) if len(lines) > 1 else lines[0]}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)


# What a user can fix (a config value, a missing or bad file, a refused resume): the packages raise
# these with a message that names the key or file and the fix. Anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)
USER_ERROR_EXIT_CODE = 2
DEBUG_ENV = "CPAL_JAX_DEBUG"


@contextlib.contextmanager
def user_errors_in_one_line(debug: bool = False):
  """A user error ends the program with `error: <message>` on one line and exit status 2; with
  debug (--config.debug=True, or CPAL_JAX_DEBUG=1) it raises as is, traceback included."""
  try:
    yield
  except USER_ERRORS as e:
    if debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
      raise
    # One line per problem (preflight reports several), whatever the message's own wrapping.
    lines = getattr(e, "problems", None) or [" ".join(str(e).split()) or type(e).__name__]
    for line in lines:
      print(f"error: {line}", file=sys.stderr)
    print(f"({len(lines)} problem(s); CPAL_JAX_DEBUG=1 shows the traceback)", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)
