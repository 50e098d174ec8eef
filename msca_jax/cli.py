"""The command-line edge every program shares: a user error is one line and exit status 2.

A mistake in what the user gave (a flag, a config field, a file) prints `error: ...` naming it,
without a traceback; anything else is our bug and keeps its traceback.

    if __name__ == "__main__":
      cli.run(main)                      # instead of absl's app.run(main)
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags
from ml_collections import config_dict
from ml_collections.config_flags.config_flags import is_config_flag  # public, not re-exported

from msca_jax.data.errors import DataError
from msca_jax.errors import UserError

EXIT_USER_ERROR = 2
USER_ERRORS = (UserError, DataError, app.UsageError)


def one_line(message: Any) -> str:
  """The message's lines joined into one (user errors are one line)."""
  return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def exit_user_error(message: Any) -> NoReturn:
  print(f"error: {one_line(message)}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _config_flags(flag_values: flags.FlagValues) -> list[flags.Flag]:
  return [flag_values[name] for name in list(flag_values)
          if is_config_flag(flag_values[name]) and name == flag_values[name].name]


def _config_argument(name: str, argv: Sequence[str]) -> str | None:
  """The value given to --NAME in argv (the last one), if any."""
  value = None
  for i, arg in enumerate(argv):
    if re.fullmatch(rf"--?{re.escape(name)}", arg) and i + 1 < len(argv):
      value = argv[i + 1]
    elif re.match(rf"--?{re.escape(name)}=", arg):
      value = arg.split("=", 1)[1]
  return value


def missing_config_file(name: str, argv: Sequence[str]) -> str | None:
  """The user error of a --config naming a file that is not there; None when it is there."""
  argument = _config_argument(name, argv)
  if argument is None:
    return None
  path = argument.split(":", 1)[0]
  if os.path.isfile(path):
    return None
  return (f"--{name}={argument}: no config file {path!r} (expected a Python file with "
          f"get_config(), e.g. configs/msca_kv.py)")


def unknown_field(config: Any, prefix: str, field_path: str) -> str | None:
  """'unknown field config.train.foo (...)' when `field_path` is not in `config`, else None."""
  node, where = config, prefix
  for part in field_path.split("."):
    key = part.split("[", 1)[0]
    if not isinstance(node, (config_dict.ConfigDict, dict)):
      return (f"unknown field {where}.{key}: {where} is a {type(node).__name__}, not a group of "
              "fields")
    keys = sorted(node.keys())
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=3)
      hint = (f"did you mean {' or '.join(f'{where}.{c}' for c in close)}?" if close
              else f"{where} has: {', '.join(keys)}")
      return f"unknown field {where}.{key} ({hint})"
    node, where = node[key], f"{where}.{key}"
  return None


def _override_paths(name: str, argv: Sequence[str]) -> list[str]:
  paths = []
  for arg in argv:
    match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if match:
      paths.append(match.group(1))
  return paths


def diagnose_config_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> str | None:
  """The user error behind a failure inside config_flags' parsing, if it is one.

  config_flags raises AttributeError / KeyError for an override of a field the config lacks and
  IOError for a config file that is not there, with a chained traceback and no field named.
  """
  for flag in _config_flags(flag_values):
    missing = missing_config_file(flag.name, argv)
    if missing:
      return missing
    paths = _override_paths(flag.name, argv)
    argument = _config_argument(flag.name, argv)
    if not paths or argument is None:
      continue
    try:
      config = flag.parser.parse(argument)
    except Exception:  # pylint: disable=broad-except  (the original error is re-raised instead)
      return None
    for path in paths:
      message = unknown_field(config, flag.name, path)
      if message:
        return message
  return None


def _flag_error_message(error: flags.Error) -> str:
  """absl's message, with a config file's wrapped traceback reduced to its last line."""
  text = str(error)
  marker = ": Error whilst parsing config file:"
  if marker in text:
    head, trace = text.split(marker, 1)
    last = [line for line in trace.splitlines() if line.strip()][-1].strip()
    return f"{head}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last)}"
  return text


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing for app.run; a mistake in the flags is a user error."""
  try:
    remaining = flag_values(argv)
  except flags.Error as e:
    exit_user_error(_flag_error_message(e))
  except (AttributeError, KeyError, OSError):
    message = diagnose_config_flags(flag_values, argv)
    if message is None:
      raise
    exit_user_error(message)
  for flag in _config_flags(flag_values):  # a missing file only fails when the config is read
    message = missing_config_file(flag.name, argv)
    if message:
      exit_user_error(message)
  return remaining


def guard(main: Callable[[list[str]], Any],
          user_errors: tuple[type[BaseException], ...] = ()) -> Callable[[list[str]], Any]:
  """`main` with USER_ERRORS (and `user_errors`) turned into one line and exit status 2."""
  def guarded(argv: list[str]) -> Any:
    try:
      return main(argv)
    except USER_ERRORS + tuple(user_errors) as e:
      exit_user_error(e)
  return guarded


def run(main: Callable[[list[str]], Any], user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """absl's app.run(main) with user errors, in the flags or from `main`, as one line."""
  app.run(guard(main, user_errors), flags_parser=parse_flags)
