"""TensorBoard event files: scalars (as `tf.summary.scalar` writes them), and the restart
marker of a resumed run.

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

import time
from pathlib import Path


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
