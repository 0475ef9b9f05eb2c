"""`vocab`: train a SentencePiece model on a deterministic sample of the documents.

Ids are seqio's: pad 0, eos 1, unk 2, no bos. The model's sha256 digest is recorded in the
manifest; every downstream stage's fingerprint includes this stage's fingerprint, which
fixes the digest (an existing model given by `model_path` is identified by its digest).
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil

from palmflow.dag.kinds import Slot, StageKind, register, setting
from palmflow.dag.store import atomic_path, file_digest, write_json
from palmflow.stages.common import path_identity

MODEL = "spm.model"


@dataclasses.dataclass(frozen=True)
class VocabSettings:
  vocab_size: int = setting(4000, doc="number of pieces (including pad/eos/unk and bytes)")
  model_type: str = setting("unigram", doc="unigram | bpe")
  sample_documents: int = setting(20000, doc="documents in the training sample (by seeded "
                                             "hash of the document id)")
  max_sentences: int = setting(200000, doc="at most this many lines go to the trainer")
  character_coverage: float = setting(0.9995, doc="SentencePiece character_coverage")
  byte_fallback: bool = setting(True, doc="unknown characters become byte pieces, not unk")
  normalization: str = setting("nmt_nfkc", doc="SentencePiece normalization rule; 'identity' "
                                              "keeps code whitespace intact")
  remove_extra_whitespaces: bool = setting(True, doc="collapse runs of spaces (False for code)")
  user_defined_symbols: list[str] = setting(default_factory=list,
                                            doc="pieces always kept whole")
  seed: int = setting(0, doc="sampling seed")
  model_path: str | None = setting(None, doc="use this existing .model instead of training")

  def validate(self):
    if self.model_type not in ("unigram", "bpe"):
      raise ValueError(f"model_type: {self.model_type!r} is not unigram or bpe")
    if self.vocab_size < 300 and self.byte_fallback:
      raise ValueError("vocab_size: byte_fallback needs at least 300 pieces (256 bytes + 3)")


def sample_lines(pattern: str, *, sample_documents: int, max_sentences: int, seed: int):
  """Deterministic sample: documents with the smallest seeded hashes, then their lines."""
  import glob as glob_lib
  from pipelines.transforms.shards import stable_hash
  docs = []
  for path in sorted(glob_lib.glob(pattern)):
    with open(path, encoding="utf-8") as f:
      for line in f:
        d = json.loads(line)
        docs.append((stable_hash(seed, d["id"]), d["text"]))
  docs.sort(key=lambda x: x[0])
  lines = []
  for _, text in docs[:sample_documents]:
    lines.extend(x for x in text.split("\n") if x.strip())
    if len(lines) >= max_sentences:
      break
  return lines[:max_sentences], min(len(docs), sample_documents)


@register
class Vocab(StageKind):
  kind = "vocab"
  version = "1"
  produces = "vocabulary"
  settings_cls = VocabSettings
  slots = {"documents": Slot(("documents",), required=False,
                             doc="the corpus to sample (not needed with model_path)")}
  doc = "SentencePiece (unigram/BPE) trained on a deterministic sample; seqio ids"

  def identity(self, settings, *, base_dir):
    ident = dataclasses.asdict(settings)
    if settings.model_path:
      ident = {"model": path_identity(base_dir, settings.model_path)}
    return ident

  def run(self, ctx):
    import sentencepiece as spm
    s = ctx.settings
    out = ctx.out_dir / MODEL
    if s.model_path:
      from palmflow.dag.executor import resolve_path
      with atomic_path(out) as tmp:
        shutil.copyfile(resolve_path(ctx.base_dir, s.model_path), tmp)
    else:
      if "documents" not in ctx.inputs:
        raise ValueError("vocab needs input 'documents' unless settings.model_path is set")
      pattern = ctx.inputs["documents"].manifest["summary"]["shard_pattern"]
      lines, ndocs = sample_lines(pattern, sample_documents=s.sample_documents,
                                  max_sentences=s.max_sentences, seed=s.seed)
      ctx.log(f"training {s.model_type} SentencePiece ({s.vocab_size} pieces) on "
              f"{len(lines)} lines of {ndocs} documents")
      model = io.BytesIO()
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_writer=model, vocab_size=s.vocab_size,
          model_type=s.model_type, character_coverage=s.character_coverage,
          byte_fallback=s.byte_fallback, normalization_rule_name=s.normalization,
          remove_extra_whitespaces=s.remove_extra_whitespaces,
          user_defined_symbols=list(s.user_defined_symbols),
          pad_id=0, eos_id=1, unk_id=2, bos_id=-1, shuffle_input_sentence=False,
          input_sentence_size=0, num_threads=2, minloglevel=2,
          hard_vocab_limit=False, split_digits=True, allow_whitespace_only_pieces=True)
      with atomic_path(out) as tmp:
        tmp.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(out))
    if (sp.pad_id(), sp.eos_id(), sp.unk_id()) != (0, 1, 2):
      raise ValueError(f"{out}: ids pad/eos/unk are {(sp.pad_id(), sp.eos_id(), sp.unk_id())}, "
                       "seqio needs (0, 1, 2); retrain with pad_id=0 eos_id=1 unk_id=2")
    info = {"model": MODEL, "sha256": file_digest(out), "vocab_size": sp.get_piece_size()}
    write_json(ctx.out_dir / "vocab.json", info)
    ctx.log(f"vocabulary {info['vocab_size']} pieces, sha256 {info['sha256'][:12]}")
    return info
