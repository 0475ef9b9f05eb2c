"""Stage identity: a hash of the kind, its code version, its semantic settings and its inputs."""
from __future__ import annotations

import hashlib
import json
from typing import Any

FINGERPRINT_CHARS = 16


def canonical(obj: Any) -> str:
  """Canonical JSON: sorted keys, tuples as lists, no whitespace."""
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(*, kind: str, version: str, identity: dict,
                inputs: dict[str, str | list[str]]) -> str:
  """The stage fingerprint.

  Args:
    kind: the stage kind name.
    version: the kind's code version.
    identity: the semantic settings (see `StageKind.identity`).
    inputs: slot -> upstream fingerprint(s).
  Returns:
    A hex string of FINGERPRINT_CHARS characters.
  """
  payload = canonical({"kind": kind, "version": version, "identity": identity,
                       "inputs": inputs})
  return hashlib.sha256(payload.encode()).hexdigest()[:FINGERPRINT_CHARS]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept whole."""
  out: dict[str, Any] = {}
  if isinstance(obj, dict):
    for k, v in obj.items():
      out.update(flatten(v, f"{prefix}{k}."))
  else:
    out[prefix[:-1]] = obj
  return out


def diff(old: dict, new: dict) -> list[str]:
  """Human-readable changes between two identity dicts."""
  a, b = flatten(json.loads(canonical(old))), flatten(json.loads(canonical(new)))
  out = []
  for k in sorted(set(a) | set(b)):
    if k not in a:
      out.append(f"{k} added ({b[k]!r})")
    elif k not in b:
      out.append(f"{k} removed (was {a[k]!r})")
    elif a[k] != b[k]:
      out.append(_changed(k, a[k], b[k]))
  return out


def _changed(key: str, old, new) -> str:
  """`key: old -> new`; for texts of several lines (a gin file), only the lines that
  differ (at most 3 each way), not both whole texts."""
  if not (isinstance(old, str) and isinstance(new, str) and ("\n" in old or "\n" in new)):
    return f"{key}: {old!r} -> {new!r}"
  import difflib
  diff = list(difflib.ndiff(old.splitlines(), new.splitlines()))
  gone = [l[2:].strip() for l in diff if l.startswith("- ")]
  came = [l[2:].strip() for l in diff if l.startswith("+ ")]
  return f"{key}: {_some_lines(gone)} -> {_some_lines(came)}"


def _some_lines(lines: list[str], n: int = 3) -> str:
  if not lines:
    return "nothing"
  more = f" (+{len(lines) - n} more)" if len(lines) > n else ""
  return "; ".join(repr(x) for x in lines[:n]) + more
