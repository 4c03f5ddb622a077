"""The command line of the experiments scripts: absl flags with ml_collections
config files (`config_flags.DEFINE_config_file`), whose every fault ends the
program before `main` with one clear line on stderr and exit status 2; the
expected failures of a run (`REPORTED_ERRORS`) end it with their message and
exit status 1.

    from experiments import cli
    ...
    if __name__ == "__main__":
      cli.run(main)

`record_in_index` adds the command's entry (its command line, config, start,
duration and the files it wrote) to a run directory's `index.md`
(`mmsafe.eval.report.update_index`).

An override of a field the config does not have (`--config.xxx=1`,
`--config.method_kwargs.rhoo=1`) names that field and the closest valid ones.
Importing this module lets a tuple field be given as comma-separated names
(`--config.data.modalities=pix,fou`), besides a quoted Python literal
(`--config.data.modalities="('pix', 'fou')"`) or a repeated flag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import difflib
import functools
import os
import re
import shlex
import sys
import time
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser

from mmsafe.data.cache import default_data_dir
from mmsafe.eval import report
from mmsafe.train.checkpoint import CheckpointNotWritten, DamagedCheckpoint
from mmsafe.train.workdir import WorkdirInUse

USAGE_EXIT_CODE = 2
# What a run reports in its message alone: a bad config value or a workdir
# holding another run (ValueError, CheckpointMismatch), a workdir in use, a
# damaged checkpoint, a missing run or another failure of the filesystem (a
# read-only or full disk: OSError), a diverged run (FloatingPointError), a
# number too large (OverflowError).
REPORTED_ERRORS = (ValueError, WorkdirInUse, DamagedCheckpoint, OSError, FloatingPointError,
                   OverflowError)
# Of those, the ones reported on one line with their type, which names the cause.
_TYPED_ERRORS = (OSError, FloatingPointError, OverflowError)
# Names separated by commas, e.g. "pix,fou" (ast.literal_eval cannot read them).
_NAME_LIST = re.compile(r"[A-Za-z_][\w-]*(,[A-Za-z_][\w-]*)+")
# What parsing a config flag and its overrides raises on a bad command line.
_PARSE_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


class NameListTupleParser(tuple_parser.TupleParser):
  """ml_collections' tuple parser that also reads "a,b" as ("a", "b")."""

  def parse(self, argument: Any) -> tuple:
    value = super().parse(argument)
    if len(value) == 1 and isinstance(value[0], str) and _NAME_LIST.fullmatch(value[0]):
      return tuple(value[0].split(","))
    return value


config_flags.register_flag_parser_for_type(tuple, NameListTupleParser())


def name_config_on_command_line(name: str, default: str, argv: list[str] = sys.argv) -> None:
  """Inserts `--<name>=<default>` into `argv` unless the config-file flag `name`
  is given. Call it before defining a config-file flag that has a default:
  ml_collections loads a default, with its overrides, when the flag is defined,
  outside `run`'s clean errors; a named config loads while flags are parsed."""
  if not any(arg.split("=")[0].lstrip("-") == name for arg in argv[1:]):
    argv.insert(1, f"--{name}={default}")


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with `parse_flags` as its flags parser. Positional
  arguments are refused, logging is at WARNING unless `--verbosity` is given
  (Orbax logs every save and restore at INFO), compiled programs are cached
  on disk (`use_compilation_cache`), and the errors of
  `REPORTED_ERRORS` that `main` raises end the program with their message on
  stderr and exit status 1 (`--verbosity=1` also logs the traceback)."""
  app.run(_reporting_errors(_program(main)), flags_parser=parse_flags)


def _program(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  @functools.wraps(main)
  def program(argv: list[str]) -> Any:
    global _started
    _started = time.time()
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    use_compilation_cache()
    return main(argv)
  return program


# When `run` started the program's `main` (for `record_in_index`).
_started = time.time()


def command_line(argv: Sequence[str] = sys.argv) -> str:
  """This program's command line: `python -m <module> <args>` when run as a
  module (as the experiments are), else the arguments as given."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  program = ["python", "-m", spec.name] if spec is not None else ["python", argv[0]]
  return shlex.join(program + list(argv[1:]))


def record_in_index(directory: str, title: str, artefacts: Iterable[str], *,
                    config: Mapping[str, Any] | None = None, key: str | None = None) -> str:
  """Adds this command's entry to `<directory>/index.md` (`report.update_index`):
  `title`, its command line, `config` (a ConfigDict or dict), when it started
  and how long it has run, and links to `artefacts` (the files it wrote); an
  entry with the same `key` (default: `title`) is replaced. Returns the path
  of index.md."""
  if config is not None and hasattr(config, "to_dict"):
    config = config.to_dict()
  return report.update_index(directory, {
      "key": key or title, "title": title, "command": command_line(), "config": config,
      "started": _started, "seconds": time.time() - _started, "artefacts": list(artefacts)})


def use_compilation_cache() -> None:
  """Turns on JAX's persistent compilation cache for every compiled program, in
  `$JAX_COMPILATION_CACHE_DIR` when set (empty: off), else `<data dir>/jax_cache`
  (`$MMSAFE_DATA_DIR`, default `~/.cache/mmsafe`): a rerun, another seed or
  another method of the same architecture reads its programs instead of
  compiling them (BUILD_NOTES, "Speed")."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # (else JAX reads it itself)
    jax.config.update("jax_compilation_cache_dir", str(default_data_dir() / "jax_cache"))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    # mmsafe's programs compile in 0.05-0.5 s each on a CPU, below JAX's default
    # threshold of 1 s, yet a run has about a hundred of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _reporting_errors(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  @functools.wraps(main)
  def reporting(argv: list[str]) -> Any:
    try:
      return main(argv)
    except REPORTED_ERRORS as e:
      logging.debug("%s", e, exc_info=True)
      message = (f"{type(e).__name__}: {' '.join(str(e).split())}"
                 if isinstance(e, _TYPED_ERRORS) else str(e))
      sys.stderr.write(f"error: {message}\n")
      if isinstance(e, (DamagedCheckpoint, CheckpointNotWritten)):
        # Orbax's abandoned reads of the damaged files, or writes of the failed
        # save, would each print a traceback at interpreter shutdown; nothing
        # is left to write.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
      sys.exit(1)
  return reporting


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses `argv` into `flag_values` and returns the remaining arguments; a bad
  flag or config override, or a config file that does not load, exits with
  `USAGE_EXIT_CODE` and one line on stderr."""
  try:
    remaining = flag_values(list(argv))
  except _PARSE_ERRORS as e:
    exit_usage(unknown_field_message(argv, flag_values) or " ".join(str(e).split()))
  except (ImportError, SyntaxError) as e:
    exit_usage(f"cannot load a config file: {_load_failure(e)}")
  for name in flag_values:
    flag = flag_values[name]
    if flag.flag_type() == "config object" and name == flag.name:
      try:  # ml_collections defers a config file's loading error to the first access.
        hasattr(flag.value, "keys")
      except OSError as e:
        exit_usage(f"--{name}: cannot load the config file: {_load_failure(e)}")
  return remaining


def _load_failure(error: BaseException) -> str:
  """The innermost cause of a config file's loading failure, on one line (e.g.
  "[Errno 2] No such file or directory: 'configs/nope.py'")."""
  while error.__cause__ is not None:
    error = error.__cause__
  if isinstance(error, SyntaxError):
    return f"SyntaxError: {error.msg} ({error.filename}, line {error.lineno})"
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def exit_usage(message: str) -> NoReturn:
  """Writes `message` as one line on stderr and exits with `USAGE_EXIT_CODE`."""
  sys.stderr.write(f"error: {message} (--helpfull lists the flags)\n")
  sys.exit(USAGE_EXIT_CODE)


def unknown_field_message(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS
                          ) -> str | None:
  """The message for the first override in `argv` of a field its config (a
  config-file flag of `flag_values`) lacks, naming the closest valid fields; None
  when every overridden field exists."""
  for name in flag_values:
    flag = flag_values[name]
    if flag.flag_type() != "config object" or name != flag.name:
      continue
    overrides = [arg.split("=", 1)[0].lstrip("-") for arg in argv
                 if re.match(rf"--?(no)?{re.escape(name)}\.", arg)]
    config = _load_config(flag, argv) if overrides else None
    for override in overrides:
      path = override.split(".", 1)[1]
      message = _unknown_field(config, name, path) if config is not None else None
      if message:
        return message
  return None


def _load_config(flag: flags.Flag, argv: Sequence[str]) -> Any:
  """The config of the config-file `flag` without its overrides (None if it cannot load)."""
  value = flag.value
  for i, arg in enumerate(argv):
    if re.fullmatch(rf"--?{re.escape(flag.name)}(=.*)?", arg):
      value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv)
                                                        else None)
  if not isinstance(value, str):
    return value
  try:
    return flag.parser.parse(value)
  except (*_PARSE_ERRORS, ImportError, OSError, SyntaxError):
    return None  # The parse error itself is reported.


def _unknown_field(config: Any, name: str, path: str) -> str | None:
  """A message if `path` (dotted) leads out of `config`'s fields, else None."""
  node, walked = config, [name]
  for part in path.split("."):
    if not hasattr(node, "keys") or "[" in part:
      return None
    fields = sorted(str(key) for key in node.keys())
    if part not in fields:
      close = difflib.get_close_matches(part, fields, n=3)
      parent = ".".join(walked)
      hint = (f"did you mean {', '.join(f'--{parent}.{c}' for c in close)}?" if close
              else f"the fields of {parent} are {', '.join(fields) or 'none'}")
      return f"--{parent}.{part}: expected a field of {parent}, got {part!r}; {hint}"
    node, walked = node[part], [*walked, part]
  return None
