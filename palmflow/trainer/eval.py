r"""The t5x-compatible eval binary: a checkpoint's seqio metrics on a task split.

    python -m palmflow.trainer.eval --gin_file=runs/eval.gin --gin_file=models/palm_tiny.gin \
        --task_spec=/store/data/<fp>/task.json --gin.MIXTURE_OR_TASK_NAME=\"demo_data.<fp>\" \
        --gin.CHECKPOINT_PATH=\"/store/finetune/<fp>/checkpoint_400\" \
        --gin.EVAL_OUTPUT_DIR=\"/tmp/eval\"

TASK_FEATURE_LENGTHS is optional: None (eval.gin's default) measures each feature's longest
example in the split.

Writes `<EVAL_OUTPUT_DIR>/<task>-<step:06>.jsonl` (predictions) and `<task>-metrics.jsonl`.
"""

from __future__ import annotations

import sys

from palmflow.trainer import gin_utils


def main(argv: list[str]) -> int:
  return gin_utils.run_main(
      argv, name="eval", doc=__doc__, fn_path="palmflow.trainer.eval_lib:evaluate",
      output_macro="EVAL_OUTPUT_DIR", result_file="eval_result.json")


if __name__ == "__main__":
  sys.exit(main(sys.argv))
