"""Beam job: a deterministic sample of the corpus, one line (or sentence) per line, for
training a vocabulary.

Documents are chosen by a seeded hash of their id, so the sample depends only on the input,
the seed and the settings, never on the runner, the worker count or the order of the input
files: either the `--sample_documents` documents with the smallest hashes, or every
document whose hash falls under `--sample_fraction` of the hash range (or both: the
fraction first, then at most N). Their text is split into lines (`--split=line`) or
sentences (`--split=sentence`: paragraphs joined, then cut after `.`, `!` or `?`); long
pieces are cut to `--max_chars`. At most `--max_lines` pieces are kept, again those with the
smallest seeded hashes, and written to one text file in hash order (a seeded shuffle),
ready for SentencePiece: `<output_dir>/sample.txt-00000-of-00001`, plus
`<output_dir>/sample_stats.json`.

Local:
    python -m pipelines.vocab_sample --runner=DirectRunner \
        --documents='/tmp/corpus/documents*' --output_dir=/tmp/vocab_sample \
        --sample_documents=20000 --max_lines=200000 --seed=0
Dataflow (workers get palmflow through --setup_file):
    python -m pipelines.vocab_sample --runner=DataflowRunner --project=P --region=R \
        --temp_location=gs://B/tmp --setup_file=./setup.py \
        --documents='gs://B/corpus/documents*' --output_dir=gs://B/vocab_sample
"""
from __future__ import annotations

import argparse
import json
import logging
import re

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.transforms import jobs, shards

NS = "palmflow.vocab_sample"
SAMPLE = "sample"
STATS = "sample_stats.json"
SPLITS = ("line", "sentence")
_HASH_RANGE = 1 << 63  # shards.stable_hash is a 63-bit hash
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def doc_key(seed: int, doc_id: str) -> tuple[int, str]:
  """The sampling key of a document: its seeded hash (ties broken by the id)."""
  return shards.stable_hash(seed, "vocab_doc", doc_id), doc_id


def split_text(text: str, *, split: str, max_chars: int) -> list[str]:
  """The non-blank lines or sentences of `text`, each cut to at most `max_chars` characters.

  Args:
    text: a document's text.
    split: `line` (every non-blank line, as written: code indentation survives) or
      `sentence` (blank-line separated paragraphs joined into one line each, then cut after
      sentence-ending punctuation followed by white space).
    max_chars: longer pieces are cut into chunks of this many characters.
  Returns:
    The pieces, in document order; none contains a line break.
  """
  if split == "line":
    pieces = [l for l in text.splitlines() if l.strip()]
  elif split == "sentence":
    pieces = []
    for para in re.split(r"\n\s*\n", text):
      joined = " ".join(l.strip() for l in para.splitlines() if l.strip())
      pieces.extend(s.strip() for s in _SENTENCE_END.split(joined) if s.strip())
  else:
    raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
  out = []
  for p in pieces:
    out.extend(p[i:i + max_chars] for i in range(0, len(p), max_chars))
  return out


class KeyDocuments(beam.DoFn):
  """JSON document line -> ((hash, id), text); drops those outside `fraction` of the range."""

  def __init__(self, seed: int, fraction: float):
    self._seed, self._fraction = seed, fraction
    self._read = beam.metrics.Metrics.counter(NS, "documents_read")
    self._kept = beam.metrics.Metrics.counter(NS, "documents_in_fraction")

  def process(self, line: str):
    doc = json.loads(line)
    self._read.inc()
    key = doc_key(self._seed, doc["id"])
    if self._fraction < 1.0 and key[0] >= self._fraction * _HASH_RANGE:
      return
    self._kept.inc()
    yield key, doc["text"]


class SplitDocument(beam.DoFn):
  """((hash, id), text) -> ((line hash, id, index), line) for each line or sentence."""

  def __init__(self, seed: int, split: str, max_chars: int):
    self._seed, self._split, self._max = seed, split, max_chars
    self._docs = beam.metrics.Metrics.counter(NS, "documents_sampled")
    self._lines = beam.metrics.Metrics.counter(NS, "lines_split")

  def process(self, item):
    (_, doc_id), text = item
    self._docs.inc()
    for i, piece in enumerate(split_text(text, split=self._split, max_chars=self._max)):
      self._lines.inc()
      yield (shards.stable_hash(self._seed, "vocab_line", doc_id, i), doc_id, i), piece


class SmallestByKey(beam.PTransform):
  """(key, value) -> the (key, value) pairs whose keys are the `n` smallest.

  Only the keys travel to one worker (through `Top.Smallest`); the values are filtered
  against the n-th smallest key as a side input, so large values are never gathered.
  Keys must be totally ordered and unique for the result to hold exactly `n` elements;
  `n=None` keeps everything.
  """

  def __init__(self, n: int | None):
    super().__init__()
    self._n = n

  def expand(self, pcoll):
    if not self._n:
      return pcoll
    n = self._n
    cutoff = (pcoll
              | "Keys" >> beam.Map(lambda kv: kv[0])
              | "Smallest" >> beam.combiners.Top.Smallest(n)
              | "Cutoff" >> beam.Map(lambda keys: keys[-1] if len(keys) >= n else None))
    return pcoll | "KeepSmallest" >> beam.Filter(
        lambda kv, c: c is None or kv[0] <= c, c=beam.pvalue.AsSingleton(cutoff))


class CountKept(beam.DoFn):
  """Counts the lines and characters that go into the sample file."""

  def __init__(self):
    self._lines = beam.metrics.Metrics.counter(NS, "lines")
    self._chars = beam.metrics.Metrics.counter(NS, "characters")

  def process(self, item):
    key, line = item
    self._lines.inc()
    self._chars.inc(len(line))
    yield key[0], line.encode("utf-8")


class SampleLines(beam.PTransform):
  """JSON document lines -> (sort key, line bytes) of the deterministic sample."""

  def __init__(self, *, seed: int = 0, sample_documents: int | None = None,
               sample_fraction: float = 1.0, split: str = "line",
               max_lines: int | None = None, max_chars: int = 4096):
    super().__init__()
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if not 0.0 < sample_fraction <= 1.0:
      raise ValueError(f"sample_fraction must be in (0, 1], not {sample_fraction}")
    self._seed, self._n, self._fraction = seed, sample_documents, sample_fraction
    self._split, self._max_lines, self._max_chars = split, max_lines, max_chars

  def expand(self, lines):
    return (lines
            | "KeyDocuments" >> beam.ParDo(KeyDocuments(self._seed, self._fraction))
            | "SampleDocuments" >> SmallestByKey(self._n)
            | "SplitDocuments" >> beam.ParDo(SplitDocument(self._seed, self._split,
                                                           self._max_chars))
            | "SampleLines" >> SmallestByKey(self._max_lines)
            | "CountKept" >> beam.ParDo(CountKept()))


def sample_path(output_dir: str) -> str:
  """The sample file the job writes under `output_dir`."""
  return shards.shard_name(FileSystems.join(output_dir, SAMPLE), 0, 1, "text")


def build(p: beam.Pipeline, args) -> None:
  """Adds the job's transforms to `p`."""
  _ = (p
       | "ReadDocuments" >> beam.io.ReadFromText(args.documents)
       | "Sample" >> SampleLines(seed=args.seed, sample_documents=args.sample_documents or None,
                                 sample_fraction=args.sample_fraction, split=args.split,
                                 max_lines=args.max_lines or None, max_chars=args.max_chars)
       | "WriteSample" >> shards.WriteShards(FileSystems.join(args.output_dir, SAMPLE),
                                             num_shards=1, fmt="text"))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--documents", required=True, help="JSONL document file pattern")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--sample_documents", type=int, default=0,
                      help="keep the N documents with the smallest seeded hashes (0: all)")
  parser.add_argument("--sample_fraction", type=float, default=1.0,
                      help="keep documents whose hash is in this fraction of the range")
  parser.add_argument("--split", default="line", choices=SPLITS)
  parser.add_argument("--max_lines", type=int, default=0,
                      help="at most this many lines/sentences (seeded hash; 0: all)")
  parser.add_argument("--max_chars", type=int, default=4096,
                      help="longer lines are cut into pieces of this many characters")
  parser.add_argument("--seed", type=int, default=0)
  args, beam_args = parser.parse_known_args(argv)
  return args, jobs.reject_unknown_flags(parser, beam_args)


def run(argv=None) -> dict:
  """Runs the job; returns the stats it also writes to `<output_dir>/sample_stats.json`."""
  args, beam_args = parse_args(argv)
  p = jobs.make_pipeline(beam_args)
  build(p, args)
  c = jobs.run_and_count(p, NS)
  if c is None:  # --dry_run: the job graph was built and nothing ran
    return {}
  stats = {"documents_read": c.get("documents_read", 0),
           "documents_in_fraction": c.get("documents_in_fraction", 0),
           "documents_sampled": c.get("documents_sampled", 0),
           "lines_split": c.get("lines_split", 0), "lines": c.get("lines", 0),
           "characters": c.get("characters", 0), "seed": args.seed,
           "sample_documents": args.sample_documents, "sample_fraction": args.sample_fraction,
           "split": args.split, "max_lines": args.max_lines,
           "sample_path": sample_path(args.output_dir)}
  jobs.write_json(FileSystems.join(args.output_dir, STATS), stats)
  return stats


if __name__ == "__main__":
  logging.getLogger().setLevel(logging.INFO)
  # run through the importable module, not this `__main__` copy of it: the job's classes
  # then pickle by reference (`pipelines.vocab_sample.X`), which the workers can import
  from pipelines import vocab_sample as job
  job.run()
