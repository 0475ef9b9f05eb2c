"""Errors a person can act on, each with a distinct exit code."""
from __future__ import annotations


class PalmflowError(Exception):
  """Base class. `exit_code` is what the command line exits with."""

  exit_code = 1


class ConfigError(PalmflowError, ValueError):
  """A pipeline file, gin file or flag is invalid; nothing has run yet.

  Also a `ValueError`, so that library callers that catch invalid arguments as such keep
  working where a setting is checked deep inside a gin-configured call (a mesh that does not
  fit the devices, a batch that does not split into microbatches).
  """

  exit_code = 2

  def __init__(self, message: str, *, path: str | None = None,
               line: int | None = None, stage: str | None = None,
               field: str | None = None, hint: str | None = None):
    where = []
    if path:
      where.append(f"{path}:{line}" if line else str(path))
    if stage:
      where.append(f"stage '{stage}'")
    if field:
      where.append(f"field '{field}'")
    text = (": ".join([", ".join(where), message]) if where else message)
    if hint:
      text += f"\n  hint: {hint}"
    super().__init__(text)
    self.path, self.line, self.stage, self.field = path, line, stage, field
    self.message, self.hint = message, hint


class StageFailed(PalmflowError):
  """A stage raised while running; its output was not published."""

  exit_code = 3


class DataError(PalmflowError):
  """Input data is missing or malformed (names the file and what to do)."""

  exit_code = 4
