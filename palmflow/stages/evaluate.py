"""`eval`: a trained checkpoint's seqio metrics on a task split, via the eval binary."""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from palmflow.dag.kinds import Slot, StageKind, register, setting
from palmflow.stages.common import run_binary
from palmflow.stages.train import final_checkpoint, gin_value


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  split: str = setting("validation", doc="the task split to evaluate")
  mode: str = setting("predict", doc="predict (greedy decoding) | rank (score each label "
                                     "option; classification)")
  batch_size: int = setting(32, doc="examples per model call")
  num_examples: int | None = setting(None, doc="evaluate the first N examples (None: all)")
  gin: dict[str, Any] = setting(default_factory=dict, doc="extra macro overrides")

  def validate(self):
    if self.mode not in ("predict", "rank"):
      raise ValueError(f"mode: {self.mode!r} is not predict or rank")


@register
class Evaluate(StageKind):
  kind = "eval"
  version = "2"  # 2: predictions in seqio's layout; decoding stops at the end of the buffer
  produces = "metrics"
  settings_cls = EvalSettings
  slots = {"model": Slot(("checkpoint",), doc="the trained stage"),
           "data": Slot(("task",), doc="the task to evaluate on")}
  doc = "seqio Evaluator metrics of a checkpoint (t5x-compatible eval binary)"

  def run(self, ctx):
    from palmflow.trainer import gin_utils
    s = ctx.settings
    model, data = ctx.inputs["model"], ctx.inputs["data"]
    spec = data.manifest["summary"]["task"]
    up = model.manifest["summary"]
    model_files = [f for f in up["gin_files"] if not f.startswith("runs/")]
    gin_files = ["runs/eval.gin"] + model_files
    search = ",".join(up.get("gin_search_paths") or [])
    texts = gin_utils.gin_texts(gin_files, gin_utils.search_paths(search))
    used = set(gin_utils._MACRO_REF.findall("\n".join(texts.values())))  # noqa: SLF001
    macros = {k: v for k, v in up["macros"].items()
              if k in used and k not in ("MIXTURE_OR_TASK_NAME", "MODEL_DIR", "BATCH_SIZE")}
    macros.update({
        "CHECKPOINT_PATH": final_checkpoint(model), "EVAL_OUTPUT_DIR": str(ctx.out_dir),
        "MIXTURE_OR_TASK_NAME": spec["name"], "TASK_FEATURE_LENGTHS": spec["feature_lengths"],
        "EVAL_SPLIT": s.split, "INFERENCE_MODE": s.mode, "BATCH_SIZE": s.batch_size,
        "EVALUATOR_NUM_EXAMPLES": s.num_examples,
        "FEATURE_CONVERTER": spec["feature_converter"]})
    macros.update(s.gin)
    argv = [sys.executable, "-m", "palmflow.trainer.eval"]
    argv += [f"--gin_file={f}" for f in gin_files]
    if search:
      argv.append(f"--gin_search_paths={search}")
    argv += [f"--task_spec={data.path / 'task.json'}"]
    argv += [f"--gin.{k}={gin_value(v)}" for k, v in macros.items()]
    run_binary(ctx, argv, log_name="eval.log")
    result = json.loads((ctx.out_dir / "eval_result.json").read_text())
    metrics = result["metrics"].get(spec["name"], {})
    ctx.log(f"step {result['step']} {s.split}: " +
            ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    return {"step": result["step"], "task": spec["name"], "metrics": metrics,
            "mode": s.mode, "split": s.split,
            "predictions_file": result["predictions_files"].get(spec["name"])}
