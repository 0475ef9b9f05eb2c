"""The t5x-compatible eval binary: a checkpoint's seqio metrics on a task split.

    python -m palmflow.trainer.eval --gin_file=runs/eval.gin --gin_file=models/palm_tiny.gin \
        --task_spec=/store/data/<fp>/task.json --gin.MIXTURE_OR_TASK_NAME=\"demo_data.<fp>\" \
        --gin.CHECKPOINT_PATH=\"/store/finetune/<fp>/checkpoint_400\" \
        --gin.EVAL_OUTPUT_DIR=\"/tmp/eval\" --gin.TASK_FEATURE_LENGTHS="{'inputs': 128, 'targets': 8}"

Writes `<EVAL_OUTPUT_DIR>/<task>-<step>.jsonl` (predictions) and `<task>-metrics.jsonl`.
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
    from palmflow.trainer import eval_lib
    out = Path(gin.query_parameter("%EVAL_OUTPUT_DIR"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.gin").write_text(gin.config_str())
    result = gin.get_configurable(eval_lib.evaluate)()
    (out / "eval_result.json").write_text(json.dumps(result, indent=2))
  except PalmflowError as e:
    print(f"palmflow eval: error: {e}", file=sys.stderr)
    return e.exit_code
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
