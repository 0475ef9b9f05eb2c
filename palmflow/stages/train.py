"""`train`: pretraining or fine-tuning through the t5x-compatible train binary.

The stage runs `python -m palmflow.trainer.train` with `--gin_file`s and `--gin.MACRO=value`
flags (the exact command is saved as `command.sh` in the stage directory, so a user can rerun
it by hand), MODEL_DIR being the stage directory. The stage is resumable: a killed run
continues from its latest checkpoint when the pipeline is run again.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from palmflow.dag.kinds import Slot, StageKind, register, setting
from palmflow.stages.common import run_binary
from palmflow.errors import ConfigError

_COMMENT = re.compile(r"^\s*#.*$|\s+#[^'\"]*$", re.M)


def gin_value(v: Any) -> str:
  """A Python value as a gin literal (strings quoted)."""
  if isinstance(v, str) and (v.startswith("@") or v.startswith("%")):
    return v
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(gin_value(x) for x in v) + "]"
  if isinstance(v, dict):
    return "{" + ", ".join(f"{gin_value(k)}: {gin_value(x)}" for k, x in v.items()) + "}"
  return repr(v)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  gin_files: list[str] = setting(doc="gin files in order, relative to the search paths, e.g. "
                                     "[runs/pretrain.gin, models/palm_tiny.gin]")
  gin: dict[str, Any] = setting(default_factory=dict,
                                doc="macro overrides, e.g. {BATCH_SIZE: 16, DROPOUT_RATE: 0.1}")
  gin_bindings: list[str] = setting(default_factory=list, doc="raw gin bindings")
  gin_search_paths: list[str] = setting(default_factory=list,
                                        doc="extra folders for gin files (relative to the "
                                            "pipeline file)")
  steps: int | None = setting(None, doc="steps to train in this stage; TRAIN_STEPS becomes "
                                        "the initial checkpoint's step + steps")
  train_split: str = setting("train", doc="the task split to train on")

  def validate(self):
    if self.steps is None and "TRAIN_STEPS" not in self.gin:
      raise ValueError("steps: set steps (relative) or gin.TRAIN_STEPS (absolute)")
    if self.steps is not None and "TRAIN_STEPS" in self.gin:
      raise ValueError("steps: set steps (relative) or gin.TRAIN_STEPS (absolute), not both")
    for k in ("MODEL_DIR", "INITIAL_CHECKPOINT_PATH", "MIXTURE_OR_TASK_NAME"):
      if k in self.gin:
        raise ValueError(f"gin.{k}: set by palmflow from the stage's inputs; remove it")


REPO = Path(__file__).resolve().parents[2]


def _below(path: Path, bases: list[Path]) -> str:
  """`path` relative to the first of `bases` that contains it (else as it is)."""
  for base in bases:
    try:
      return str(path.resolve().relative_to(Path(base).resolve()))
    except ValueError:
      continue
  return str(path)


def _normalized_gin(text: str) -> str:
  lines = [_COMMENT.sub("", l).rstrip() for l in text.splitlines()]
  return "\n".join(l for l in lines if l.strip())


def vocab_size_of(model_path: str) -> int:
  import sentencepiece as spm
  return spm.SentencePieceProcessor(model_file=model_path).get_piece_size()


def padded_vocab_size(n: int, multiple: int = 128) -> int:
  """Embedding rows: the vocabulary rounded up so the vocab axis shards evenly."""
  return -(-n // multiple) * multiple


def final_checkpoint(upstream) -> str:
  return str(upstream.path / f"checkpoint_{upstream.manifest['summary']['step']}")


@register
class Train(StageKind):
  kind = "train"
  # 2: Adafactor factors by logical axes (t5x's rules): other optimizer state shapes and
  # steps, so a run of version 1 cannot resume.
  # 3: inference_eval/ in seqio's layout (<task>-<step:06>.jsonl rows with "input"), the
  # target_tokens metrics, decoding that stops at the end of the buffer.
  version = "3"
  produces = "checkpoint"
  settings_cls = TrainSettings
  resumable = True
  slots = {"data": Slot(("task",), doc="the seqio task to train on"),
           "init": Slot(("checkpoint",), required=False,
                        doc="fine-tune from this stage's final checkpoint")}
  doc = "t5x-compatible training (gin) -> Orbax checkpoints, metrics, config.gin"

  def identity(self, settings, *, base_dir):
    from palmflow.trainer import gin_utils
    paths = ",".join(str(base_dir / p) for p in settings.gin_search_paths)
    search = gin_utils.search_paths(paths)
    # The files the binary will read: it runs in the repository's folder (`run_binary`).
    texts = gin_utils.gin_texts(settings.gin_files, search, cwd=REPO)
    ident = dataclasses.asdict(settings)
    # Keyed by file name (as before, so existing stages keep their fingerprints); files of
    # one name in different folders (a run file including another of its name) are keyed by
    # their paths below the folder they were found in, so neither is dropped.
    names = [Path(k).name for k in texts]
    ident["resolved_gin"] = {
        (Path(k).name if names.count(Path(k).name) == 1 else _below(Path(k), [REPO, *search])):
        _normalized_gin(v) for k, v in sorted(texts.items())}
    # A misspelt macro fails here, before any stage runs (the binary would refuse it only
    # after the stages upstream of this one had run).
    try:
      gin_utils.check_macro_overrides([f"{k} = {gin_value(v)}" for k, v in settings.gin.items()],
                                      texts)
    except ConfigError as e:
      raise ConfigError(e.message, field=f"settings.gin.{e.field.removeprefix('--gin.')}",
                        hint=e.hint) from None
    return ident

  def command(self, ctx) -> tuple[list[str], dict]:
    """The train binary's argv and the facts it was built from."""
    s = ctx.settings
    data = ctx.inputs["data"]
    spec = data.manifest["summary"]["task"]
    macros: dict[str, Any] = {
        "MODEL_DIR": str(ctx.out_dir), "MIXTURE_OR_TASK_NAME": spec["name"],
        "TASK_FEATURE_LENGTHS": spec["feature_lengths"],
        "VOCAB_SIZE": padded_vocab_size(vocab_size_of(spec["vocab_path"])),
        "FEATURE_CONVERTER": spec["feature_converter"]}
    if s.train_split != "train":
      macros["TRAIN_SPLIT"] = s.train_split
    start = 0
    init = ctx.inputs.get("init")
    if init is not None:
      macros["INITIAL_CHECKPOINT_PATH"] = final_checkpoint(init)
      start = init.manifest["summary"]["step"]
      init_vocab = init.manifest["summary"].get("vocab_sha256")
      if init_vocab and init_vocab != spec.get("vocab_sha256"):
        raise ConfigError(f"the task's vocabulary ({spec.get('vocab_sha256', '?')[:12]}) is "
                          f"not the one '{init.name}' was trained with ({init_vocab[:12]})",
                          stage=ctx.name, field="inputs.init")
    if spec.get("augment"):
      macros["MIXTURE_OR_TASK_NAME"] = spec["name"] + ".augmented"
      macros["TRAIN_EVAL_MIXTURE_OR_TASK_NAME"] = spec["name"]
    if s.steps is not None:
      macros["TRAIN_STEPS"] = start + s.steps
    macros.update(s.gin)
    search = [str(ctx.base_dir / p) for p in s.gin_search_paths]
    argv = [sys.executable, "-m", "palmflow.trainer.train"]
    argv += [f"--gin_file={f}" for f in s.gin_files]
    if search:
      argv.append(f"--gin_search_paths={','.join(search)}")
    argv += [f"--task_spec={data.path / 'task.json'}"]
    argv += [f"--gin.{k}={gin_value(v)}" for k, v in macros.items()]
    argv += [f"--gin_bindings={b}" for b in s.gin_bindings]
    return argv, {"task": spec["name"], "start_step": start,
                  "vocab_sha256": spec.get("vocab_sha256"), "macros": macros}

  def run(self, ctx):
    argv, facts = self.command(ctx)
    run_binary(ctx, argv, log_name="train.log")
    result = json.loads((ctx.out_dir / "train_result.json").read_text())
    spec_vocab = facts["vocab_sha256"]
    loss = result["train"].get("loss", float("nan"))
    ctx.log(f"trained to step {result['step']}: loss {loss:.3f}")
    return {"step": result["step"], "final_train": result["train"],
            "final_eval": result["eval"], "num_params": result.get("num_params"),
            "task": facts["task"], "start_step": facts["start_step"],
            "vocab_sha256": spec_vocab, "gin_files": list(ctx.settings.gin_files),
            "gin_search_paths": [str(ctx.base_dir / p) for p in ctx.settings.gin_search_paths],
            "macros": {k: v for k, v in facts["macros"].items()}}
