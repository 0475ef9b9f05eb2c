"""`vocab`: train a SentencePiece model on a deterministic Beam sample of the documents.

The sample is the Beam job `pipelines/vocab_sample.py` (documents chosen by a seeded hash of
their id, split into lines or sentences, at most `max_sentences` of them); SentencePiece
(unigram or BPE) then trains on it in this process. Ids are seqio's: pad 0, eos 1, unk 2, no
bos; user-defined symbols come next (3, 4, ...). The model's sha256 digest is recorded in
the manifest and in `vocab.json`; every downstream stage's fingerprint includes this stage's
fingerprint, which fixes the digest (an existing model given by `model_path` is identified by
its digest).

SentencePiece output is identical byte for byte for the same sample and settings, but it
depends on `num_threads` (the trainer splits the work by thread), so `num_threads` is a
semantic setting, 1 by default.

Local (as part of a pipeline):
    palmflow run pipelines/examples/stdlib_demo.yaml --only corpus,vocab
The sample job alone, on Dataflow: see `pipelines/vocab_sample.py`.
"""
from __future__ import annotations

import dataclasses
import io
import shutil
from typing import Iterable

from palmflow.dag.kinds import Slot, StageKind, register, setting
from palmflow.dag.store import atomic_path, file_digest, write_json
from palmflow.stages.common import beam_args, beam_summary, path_identity

MODEL = "spm.model"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class VocabSettings:
  vocab_size: int = setting(4000, doc="number of pieces (including pad/eos/unk and bytes)")
  model_type: str = setting("unigram", doc="unigram | bpe")
  sample_documents: int | None = setting(
      20000, doc="documents in the training sample: those with the smallest seeded hashes of "
                 "their ids (null: no limit)")
  sample_fraction: float = setting(1.0, doc="keep only documents whose seeded hash falls in "
                                            "this fraction of the hash range (applied first)")
  split: str = setting("line", doc="line (every non-blank line; right for code) | sentence "
                                   "(paragraphs joined, cut at sentence ends; for prose)")
  max_sentences: int | None = setting(200000, doc="at most this many lines/sentences go to "
                                                  "the trainer (smallest seeded hashes)")
  max_sentence_chars: int = setting(4096, doc="longer lines are cut into pieces this long")
  character_coverage: float = setting(0.9995, doc="SentencePiece character_coverage")
  byte_fallback: bool = setting(True, doc="unknown characters become byte pieces, not unk")
  normalization: str = setting("nmt_nfkc", doc="SentencePiece normalization rule; 'identity' "
                                              "keeps code whitespace intact")
  remove_extra_whitespaces: bool = setting(True, doc="collapse runs of spaces (False for code)")
  split_digits: bool = setting(True, doc="every digit is its own piece (as in PaLM)")
  user_defined_symbols: list[str] = setting(default_factory=list,
                                            doc="pieces always kept whole (ids 3, 4, ...)")
  num_threads: int = setting(1, doc="SentencePiece trainer threads; the model's bytes depend "
                                    "on it, so it is part of the stage's identity")
  seed: int = setting(0, doc="sampling seed")
  model_path: str | None = setting(None, doc="use this existing .model instead of training")

  def validate(self):
    if self.model_type not in ("unigram", "bpe"):
      raise ValueError(f"model_type: {self.model_type!r} is not unigram or bpe")
    if self.vocab_size < 300 and self.byte_fallback:
      raise ValueError("vocab_size: byte_fallback needs at least 300 pieces (256 bytes + 3)")
    if self.split not in ("line", "sentence"):
      raise ValueError(f"split: {self.split!r} is not line or sentence")
    if not 0.0 < self.sample_fraction <= 1.0:
      raise ValueError(f"sample_fraction: {self.sample_fraction} is not in (0, 1]")
    if self.num_threads < 1:
      raise ValueError("num_threads: must be at least 1")
    if self.max_sentence_chars < 16:
      raise ValueError("max_sentence_chars: must be at least 16")
    for name in ("sample_documents", "max_sentences"):  # None: no limit
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name}: must be at least 1, or null for no limit")


def train_sentencepiece(lines: Iterable[str], s: VocabSettings) -> bytes:
  """Trains a SentencePiece model on `lines` (in the given order); returns the model bytes.

  Args:
    lines: the training sentences, one piece of text each (no line breaks).
    s: the settings (vocab size, model type, coverage, byte fallback, symbols, threads).
  Returns:
    The serialized model. Ids: pad 0, eos 1, unk 2, no bos.
  """
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=s.vocab_size,
      model_type=s.model_type, character_coverage=s.character_coverage,
      byte_fallback=s.byte_fallback, normalization_rule_name=s.normalization,
      remove_extra_whitespaces=s.remove_extra_whitespaces,
      user_defined_symbols=list(s.user_defined_symbols), split_digits=s.split_digits,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      shuffle_input_sentence=False, input_sentence_size=0,
      max_sentence_length=4 * s.max_sentence_chars + 16, num_threads=s.num_threads,
      minloglevel=2, hard_vocab_limit=False, allow_whitespace_only_pieces=True)
  return model.getvalue()


def read_sample(path: str) -> list[str]:
  """The lines of a sample file written by `pipelines/vocab_sample.py`."""
  from apache_beam.io.filesystems import FileSystems
  with FileSystems.open(path) as f:
    return f.read().decode("utf-8").split("\n")[:-1]


def check_ids(model_path: str) -> int:
  """Checks seqio's ids (pad 0, eos 1, unk 2); returns the number of pieces.

  Raises:
    ValueError: naming the model file and the ids it has.
  """
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=model_path)
  ids = (sp.pad_id(), sp.eos_id(), sp.unk_id())
  if ids != (PAD_ID, EOS_ID, UNK_ID):
    raise ValueError(f"{model_path}: ids pad/eos/unk are {ids}, seqio needs (0, 1, 2); "
                     "retrain with pad_id=0 eos_id=1 unk_id=2")
  return sp.get_piece_size()


@register
class Vocab(StageKind):
  kind = "vocab"
  version = "2"
  runs_beam = True
  produces = "vocabulary"
  settings_cls = VocabSettings
  slots = {"documents": Slot(("documents",), required=False,
                             doc="the corpus to sample (not needed with model_path)")}
  doc = "SentencePiece (unigram/BPE) trained on a deterministic Beam sample; seqio ids"

  def identity(self, settings, *, base_dir):
    ident = dataclasses.asdict(settings)
    if settings.model_path:
      ident = {"model": path_identity(base_dir, settings.model_path)}
    return ident

  def run(self, ctx):
    s = ctx.settings
    out = ctx.out_dir / MODEL
    summary: dict = {}
    if s.model_path:
      from palmflow.dag.executor import resolve_path
      with atomic_path(out) as tmp:
        shutil.copyfile(resolve_path(ctx.base_dir, s.model_path), tmp)
    else:
      if "documents" not in ctx.inputs:
        from palmflow.errors import ConfigError
        raise ConfigError("vocab needs input 'documents' unless settings.model_path is set",
                          stage=ctx.name, field="inputs.documents")
      from pipelines import vocab_sample as job
      pattern = ctx.inputs["documents"].manifest["summary"]["shard_pattern"]
      argv = [f"--documents={pattern}", f"--output_dir={ctx.out_dir}",
              f"--sample_documents={s.sample_documents or 0}",
              f"--sample_fraction={s.sample_fraction}", f"--split={s.split}",
              f"--max_lines={s.max_sentences or 0}", f"--max_chars={s.max_sentence_chars}",
              f"--seed={s.seed}"]
      ctx.log(f"Beam job pipelines.vocab_sample on {beam_summary(ctx.placement)}")
      stats = job.run(argv + beam_args(ctx.placement,
                                       job_name=f"{ctx.pipeline}-{ctx.name}-sample"))
      lines = read_sample(stats["sample_path"])
      ctx.log(f"training {s.model_type} SentencePiece ({s.vocab_size} pieces) on "
              f"{len(lines)} {s.split}s of {stats['documents_sampled']} sampled documents "
              f"(of {stats['documents_read']})")
      model = train_sentencepiece(lines, s)
      summary["model_type"] = s.model_type
      with atomic_path(out) as tmp:
        tmp.write_bytes(model)
      summary["sample"] = {k: stats[k] for k in ("documents_read", "documents_sampled",
                                                  "lines", "characters")}
      summary["sample"]["sha256"] = file_digest(stats["sample_path"])
    info = {"model": MODEL, "sha256": file_digest(out), "vocab_size": check_ids(str(out)),
            **summary}
    write_json(ctx.out_dir / "vocab.json", info)
    ctx.log(f"vocabulary {info['vocab_size']} pieces, sha256 {info['sha256'][:12]}")
    return info
