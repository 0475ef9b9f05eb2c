"""`blocks`: tokenize documents and block them into fixed-length shards (a Beam job)."""
from __future__ import annotations

import dataclasses

from palmflow.dag.kinds import Slot, StageKind, register, setting
from palmflow.dag.store import write_json
from palmflow.stages.common import beam_args, beam_summary


@dataclasses.dataclass(frozen=True)
class BlocksSettings:
  block_length: int = setting(512, doc="tokens per block (TASK_FEATURE_LENGTHS targets)")
  mode: str = setting("concat", doc="concat: documents joined with EOS and cut (PaLM); "
                                    "pad: one document per block, trimmed or padded")
  num_shards: int = setting(4, doc="output shards")
  num_buckets: int = setting(8, doc="about how many contiguous byte ranges the documents are "
                                    "cut into (the unit of parallelism; each range's tail is "
                                    "packed with the others')")
  max_range_mb: float = setting(256.0, doc="more ranges than num_buckets where a range would "
                                           "be larger than this (MB of documents)")
  format: str = setting("tfrecord", doc="tfrecord | array_record")
  seed: int = setting(0, doc="shuffle seed (blocks across shards)")

  def validate(self):
    if self.mode not in ("concat", "pad"):
      raise ValueError(f"mode: {self.mode!r} is not concat or pad")
    if self.format not in ("tfrecord", "array_record"):
      raise ValueError(f"format: {self.format!r} is not tfrecord or array_record")
    if self.block_length < 2:
      raise ValueError("block_length: must be at least 2")
    if self.max_range_mb <= 0:
      raise ValueError("max_range_mb: must be positive")
    for name in ("num_shards", "num_buckets"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}: must be at least 1")


def task_name(pipeline: str, stage: str, fingerprint: str) -> str:
  return f"{pipeline}_{stage}.{fingerprint}"


@register
class Blocks(StageKind):
  kind = "blocks"
  version = "3"   # 3: blocks cut from contiguous byte ranges in file order
  runs_beam = True
  produces = "task"
  settings_cls = BlocksSettings
  slots = {"documents": Slot(("documents",)), "vocab": Slot(("vocabulary",))}
  doc = "Beam: tokenize + block into TFRecord/ArrayRecord shards; registers a seqio Task"

  def run(self, ctx):
    from pipelines import blocks as job
    s = ctx.settings
    docs = ctx.inputs["documents"].manifest["summary"]["shard_pattern"]
    vocab = ctx.inputs["vocab"]
    vocab_path = str(vocab.path / vocab.manifest["summary"]["model"])
    argv = [f"--documents={docs}", f"--vocab={vocab_path}", f"--output_dir={ctx.out_dir}",
            f"--block_length={s.block_length}", f"--mode={s.mode}",
            f"--num_shards={s.num_shards}", f"--num_buckets={s.num_buckets}",
            f"--max_range_mb={s.max_range_mb}",
            f"--format={s.format}", f"--seed={s.seed}"]
    ctx.log(f"Beam job pipelines.blocks on {beam_summary(ctx.placement)}")
    stats = job.run(argv + beam_args(ctx.placement, job_name=f"{ctx.pipeline}-{ctx.name}"))
    ctx.log(f"{stats['documents']} documents, {stats['tokens']} tokens -> {stats['blocks']} "
            f"blocks of {s.block_length}; packing efficiency "
            f"{stats['packing_efficiency']:.4f}")
    if not stats["blocks"]:
      from palmflow.errors import DataError
      raise DataError(f"no block was made from {docs} "
                      f"({stats['documents']} documents); a task without examples cannot "
                      "train: check the corpus stage's output")
    spec = {"type": "blocked_lm", "name": task_name(ctx.pipeline, ctx.name, ctx.fingerprint),
            "file_pattern": stats["shard_pattern"], "vocab_path": vocab_path,
            "vocab_sha256": vocab.manifest["summary"]["sha256"],
            "block_length": s.block_length, "format": s.format,
            "feature_lengths": {"targets": s.block_length},
            "feature_converter": "blocked_lm", "splits": ["train"]}
    write_json(ctx.out_dir / "task.json", spec)
    return {"task": spec, "stats": stats}
