r"""The t5x-compatible train binary.

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
(metrics.jsonl and TensorBoard events), and inference_eval/ (the task's metrics on the
model's predictions, with INFER_EVAL_MIXTURE_OR_TASK_NAME).
"""

from __future__ import annotations

import sys

from palmflow.trainer import gin_utils


def main(argv: list[str]) -> int:
  return gin_utils.run_main(
      argv, name="train", doc=__doc__, fn_path="palmflow.trainer.train_lib:train",
      output_macro="MODEL_DIR", result_file="train_result.json")


if __name__ == "__main__":
  sys.exit(main(sys.argv))
