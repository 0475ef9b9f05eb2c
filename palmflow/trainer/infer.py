r"""The t5x-compatible infer binary: predictions or scores of a checkpoint, in t5x's layout.

    python -m palmflow.trainer.infer --gin_file=runs/infer.gin --gin_file=models/palm_tiny.gin \
        --task_spec=/store/data/<fp>/task.json --gin.MIXTURE_OR_TASK_NAME=\"demo_data.<fp>\" \
        --gin.CHECKPOINT_PATH=\"/store/finetune/<fp>/checkpoint_400\" \
        --gin.INFER_OUTPUT_DIR=\"/tmp/infer\" --gin.INFER_MODE=\"score\"
(also `palmflow infer ...` with the same flags; TASK_FEATURE_LENGTHS, optional, defaults to
each feature's longest example in the split). Writes
`<INFER_OUTPUT_DIR>/<task>-<mode>.jsonl-00000-of-00001` (one JSON per example: its inputs
and its prediction, score, or prediction with aux scores), `config.gin` and
`infer_result.json`.
"""

from __future__ import annotations

import sys

from palmflow.trainer import gin_utils


def main(argv: list[str]) -> int:
  return gin_utils.run_main(
      argv, name="infer", doc=__doc__, fn_path="palmflow.trainer.eval_lib:infer",
      output_macro="INFER_OUTPUT_DIR", result_file="infer_result.json")


if __name__ == "__main__":
  sys.exit(main(sys.argv))
