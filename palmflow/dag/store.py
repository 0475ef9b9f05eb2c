"""The store: `<store>/<stage>/<fingerprint>/` directories, atomic files, COMPLETED markers.

A stage directory is finished when its `COMPLETED` marker exists; the marker is written
last, and every file is written under a temporary name and renamed into place, so a killed
run never leaves something that looks finished.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

COMPLETED = "COMPLETED"
MANIFEST = "manifest.json"
LATEST = "LATEST.json"


def default_root() -> Path:
  """`--store`, else `$PALMFLOW_STORE`, else `./palmflow_store`."""
  return Path(os.environ.get("PALMFLOW_STORE") or "palmflow_store")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
  """Yields a temporary sibling path; renames it onto `path` when the block succeeds."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    yield Path(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
  with atomic_path(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_digest(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


class Store:
  """Stage output directories under one root."""

  def __init__(self, root: str | Path):
    self.root = Path(root).resolve()

  def stage_dir(self, stage: str, fingerprint: str) -> Path:
    return self.root / stage / fingerprint

  def is_complete(self, stage: str, fingerprint: str) -> bool:
    return (self.stage_dir(stage, fingerprint) / COMPLETED).exists()

  def manifest(self, stage: str, fingerprint: str) -> dict:
    return json.loads((self.stage_dir(stage, fingerprint) / MANIFEST).read_text())

  def latest(self, stage: str) -> dict | None:
    """The record of the last completed run of `stage` (for 'what changed' in plans)."""
    p = self.root / stage / LATEST
    try:
      return json.loads(p.read_text())
    except (OSError, ValueError):
      return None

  def prepare(self, stage: str, fingerprint: str, *, resumable: bool) -> Path:
    """Creates the stage dir; wipes a partial one unless the kind can resume it."""
    d = self.stage_dir(stage, fingerprint)
    if d.exists() and not resumable:
      shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    return d

  def publish(self, stage: str, fingerprint: str, manifest: dict) -> None:
    """Writes the manifest, then COMPLETED (last), then the stage's LATEST record."""
    d = self.stage_dir(stage, fingerprint)
    write_json(d / MANIFEST, manifest)
    write_json(d / COMPLETED, {"fingerprint": fingerprint,
                               "finished": manifest.get("finished")})
    write_json(self.root / stage / LATEST, {
        "fingerprint": fingerprint, "identity": manifest["identity"],
        "inputs": manifest["inputs"], "kind_version": manifest.get("kind_version")})
