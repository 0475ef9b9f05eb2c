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
      out.append(f"{k}: {a[k]!r} -> {b[k]!r}")
  return out
