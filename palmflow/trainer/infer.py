"""The t5x-compatible infer binary: predictions or scores of a checkpoint, in t5x's layout.

    python -m palmflow.trainer.infer --gin_file=runs/infer.gin --gin_file=models/palm_tiny.gin \
        --task_spec=/store/data/<fp>/task.json --gin.MIXTURE_OR_TASK_NAME=\"demo_data.<fp>\" \
        --gin.CHECKPOINT_PATH=\"/store/finetune/<fp>/checkpoint_400\" \
        --gin.INFER_OUTPUT_DIR=\"/tmp/infer\" --gin.TASK_FEATURE_LENGTHS="{'inputs': 128, 'targets': 8}" \
        --gin.INFER_MODE=\"score\"
(also `palmflow infer ...` with the same flags). Writes
`<INFER_OUTPUT_DIR>/<task>-<mode>.jsonl-00000-of-00001` (one JSON per example: its inputs
and its prediction, score, or prediction with aux scores), `config.gin` and
`infer_result.json`.
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
    out = Path(gin.query_parameter("%INFER_OUTPUT_DIR"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.gin").write_text(gin.config_str())
    result = gin.get_configurable(eval_lib.infer)()
    (out / "infer_result.json").write_text(json.dumps(result, indent=2))
  except PalmflowError as e:
    print(f"palmflow infer: error: {e}", file=sys.stderr)
    return e.exit_code
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
