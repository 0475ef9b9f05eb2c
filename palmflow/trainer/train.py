"""The t5x-compatible train binary.

Local (CPU):
    python -m palmflow.trainer.train --gin_file=runs/pretrain.gin \
        --gin_file=models/palm_tiny.gin --task_spec=/store/blocks/<fp>/task.json \
        --gin.MIXTURE_OR_TASK_NAME=\"demo_blocks.<fp>\" \
        --gin.TASK_FEATURE_LENGTHS="{'targets': 128}" --gin.TRAIN_STEPS=100 \
        --gin.MODEL_DIR=\"/tmp/run\"
Multi-host (one command per host; add --gin_file=partitioning/model_parallel.gin etc.):
    python -m palmflow.trainer.train ... --coordinator_address=host0:1234 \
        --process_count=2 --process_index=$I

Writes MODEL_DIR/config.gin (the parsed configuration), model-info.txt (every parameter's
shape and partition spec), checkpoint_<step>/, train/ and training_eval/ metrics
(metrics.jsonl and TensorBoard events).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import gin

from palmflow.errors import PalmflowError
from palmflow.trainer import gin_utils


def main(argv: list[str]) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger("palmflow").setLevel(logging.INFO)
  try:
    args = gin_utils.parse_flags(argv[1:], __doc__)
    gin_utils.setup_runtime(args)
    gin_utils.parse(args.gin_file, args.gin_bindings, args.gin_search_paths)
    from palmflow.trainer import train_lib
    train_fn = gin.get_configurable(train_lib.train)
    model_dir = Path(gin.query_parameter("%MODEL_DIR"))
    model_dir.mkdir(parents=True, exist_ok=True)
    import jax
    if jax.process_index() == 0:
      (model_dir / "config.gin").write_text(gin.config_str())
    result = train_fn()
    if jax.process_index() == 0:
      (model_dir / "train_result.json").write_text(json.dumps(result, indent=2))
  except PalmflowError as e:
    print(f"palmflow train: error: {e}", file=sys.stderr)
    return e.exit_code
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
