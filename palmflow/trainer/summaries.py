"""The trainer's metrics files: TensorBoard event files (scalars, as `tf.summary.scalar`
writes them, and the restart marker of a resumed run), and the metrics.jsonl lines a resumed
run reads back or cuts.

A run killed after step T resumes from its last checkpoint, step S < T, and logs steps
S+1..T again. Its event files still hold the first run's S+1..T, which TensorBoard would draw
beside the new ones. A writer made with `restart_step=S + 1` starts its file with the
`SessionLog.START` event of that step: TensorBoard's Python loader (`tensorboard
--load_fast=false`, and tools on its `EventAccumulator`) then drops what earlier files logged
at that step and after (its purge of orphaned data), as it did for TensorFlow's restarted
sessions. That loader takes the first START it reads in a directory for the session's start
and purges nothing for it, so the marker is written twice: a directory whose first run wrote
none (an older palmflow) is purged at its first resume too. TensorBoard's default fast
loader does not read the marker. The metrics.jsonl files beside the events are cut at S by
the trainer.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("palmflow.train")


class EventWriter:
  """One new event file in `directory`."""

  def __init__(self, directory: str | Path, *, restart_step: int | None = None):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    self._event = event_pb2.Event
    self._writer = EventFileWriter(str(directory))
    if restart_step is not None:
      for _ in range(2):  # the loader ignores the first START of a directory
        self._writer.add_event(event_pb2.Event(
            wall_time=time.time(), step=int(restart_step),
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
      self._writer.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """Writes each value under its name at `step`, and flushes."""
    from tensorboard.plugins.scalar import summary_v2
    for name, value in values.items():
      self._writer.add_event(self._event(wall_time=time.time(), step=int(step),
                                         summary=summary_v2.scalar_pb(name, float(value))))
    self._writer.flush()


def truncate_metrics(path: Path, max_step: int) -> None:
  """Drops logged lines after `max_step` (a resumed run re-logs those steps).

  A line that is not a whole JSON record (the run was killed while appending it) is dropped
  with a warning. The file is replaced atomically.
  """
  if not path.exists():
    return
  keep = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      log.warning("%s:%d: dropping a partly written metrics line (the run was interrupted "
                  "while writing it)", path, number)
      continue
    if step <= max_step:
      keep.append(line)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(l + "\n" for l in keep), encoding="utf-8")
  tmp.replace(path)


def logged_line(path: Path, step: int) -> dict | None:
  """The metrics logged for `step` in a metrics.jsonl (without "step"), or None."""
  if not path.exists():
    return None
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and record.get("step") == step:
      return {k: v for k, v in record.items() if k != "step"}
  return None
