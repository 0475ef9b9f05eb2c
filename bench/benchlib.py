"""What the training benchmarks share: the CPU malloc settings, a gin model, a batch."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from palmflow.stages.common import CPU_MALLOC_ENV  # noqa: E402  (light: no jax)


def reexec_with_cpu_malloc() -> None:
  """Restarts this script with `CPU_MALLOC_ENV` unless it is set (glibc reads it at start-up),
  as `train` runs: without it, every step faults its freed buffers in afresh."""
  if any(os.environ.get(k) != v for k, v in CPU_MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CPU_MALLOC_ENV})


def gin_model(name: str, bindings: Iterable[str] = ()) -> tuple[Any, Any]:
  """(`%MODEL`, `%LEARNING_RATE`) of gin/models/palm_<name>.gin with extra `bindings`."""
  import gin

  from palmflow.trainer import gin_utils
  gin.clear_config()
  gin_utils.parse([f"models/palm_{name}.gin"], list(bindings))
  model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  schedule = gin.query_parameter("%LEARNING_RATE").scoped_configurable_fn()
  gin.clear_config()
  return model, schedule


def random_batch(rng, vocab: int, batch: int, length: int) -> dict:
  """A host batch of random tokens as the decoder feature converter lays it out (one
  document per row, every target weighted)."""
  import numpy as np
  return {"decoder_input_tokens": rng.integers(1, vocab, (batch, length), dtype=np.int32),
          "decoder_target_tokens": rng.integers(1, vocab, (batch, length), dtype=np.int32),
          "decoder_loss_weights": np.ones((batch, length), np.int32),
          "decoder_segment_ids": np.ones((batch, length), np.int32),
          "decoder_positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1))}
