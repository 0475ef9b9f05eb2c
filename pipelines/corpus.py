"""Beam job: read named sources, normalize, filter, dedup, write JSONL document shards.

Local:
    python -m pipelines.corpus --runner=DirectRunner --output_dir=/tmp/corpus \
        --sources='[{"name": "stdlib", "format": "python_stdlib"}]'
Dataflow:
    python -m pipelines.corpus --runner=DataflowRunner --project=P --region=R \
        --temp_location=gs://B/tmp --setup_file=./setup.py --output_dir=gs://B/corpus \
        --sources='[{"name": "books", "format": "text", "path": "gs://B/books/*.txt"}]'

Writes `documents.jsonl-NNNNN-of-NNNNN` (one JSON document per line, sorted by id within a
shard) and `stats.json` (documents in/out, bytes, rejections by reason, per-source counts).
"""
from __future__ import annotations

import argparse
import json
import logging

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.transforms import jobs, shards
from pipelines.transforms.progress import Progress

STATS = "stats.json"


# What a `python_stdlib` source may set besides its name and format (`ReadPythonStdlib`).
STDLIB_OPTIONS = ("include", "exclude", "sample_fraction", "seed")


def read_sources(pbegin, sources: list[dict]):
  """Reads every named source into one PCollection of documents."""
  pcolls = []
  others = [s for s in sources if s.get("format") != "python_stdlib"]
  for s in sources:
    if s.get("format") == "python_stdlib":
      from pipelines.transforms.stdlib import ReadPythonStdlib
      opts = {k: v for k, v in s.items() if k in STDLIB_OPTIONS}
      pcolls.append(pbegin | f"Read[{s['name']}]" >> ReadPythonStdlib(name=s["name"],
                                                                        **opts))
  if others:
    from pipelines.transforms.ingest import ReadSources
    pcolls.append(pbegin | "ReadFiles" >> ReadSources(others))
  if len(pcolls) == 1:
    return pcolls[0]
  return tuple(pcolls) | "AllSources" >> beam.Flatten()


class _Count(beam.DoFn):
  """Counts documents and bytes per source (Beam metrics, read back into stats.json)."""

  def __init__(self, stage: str):
    self._stage = stage

  def process(self, doc):
    src = doc.get("source", "?")
    beam.metrics.Metrics.counter(f"palmflow.{self._stage}", f"docs[{src}]").inc()
    beam.metrics.Metrics.counter(f"palmflow.{self._stage}", f"bytes[{src}]").inc(
        len(doc["text"].encode("utf-8")))
    yield doc


def build(p: beam.Pipeline, args) -> None:
  """Adds the job's transforms to `p`."""
  sources = json.loads(args.sources)
  docs = (read_sources(p, sources)
          | "CountIn" >> beam.ParDo(_Count("in"))
          | "Progress" >> Progress("corpus", "documents read"))
  rejected = []
  # NULs removed and newlines unified whatever the Unicode form ('' skips only the form).
  from pipelines.transforms.clean import Normalize
  docs = docs | "Normalize" >> Normalize(form=args.normalize or None)
  # Always filtered: the default FilterConfig rejects only empty (whitespace-only)
  # documents, which would otherwise be kept and deduplicated against each other.
  from pipelines.transforms.clean import Filter, FilterConfig
  out = docs | "Filter" >> Filter(FilterConfig(**json.loads(args.filters or "{}")))
  docs, rej = out.kept, out.rejected
  rejected.append(rej)
  if args.dedup in ("exact", "near", "exact+near"):
    from pipelines.transforms import dedup
    if "exact" in args.dedup:
      out = docs | "ExactDedup" >> dedup.ExactDedup()
      docs = out.kept
      rejected.append(out.removed | "ExactReason" >> beam.Map(
          lambda i: {"id": i, "reason": "exact_duplicate"}))
    if "near" in args.dedup:
      cfg = json.loads(args.near_dedup or "{}")
      out = docs | "NearDedup" >> dedup.NearDedup(**cfg)
      docs = out.kept
      rejected.append(out.removed | "NearReason" >> beam.Map(
          lambda i: {"id": i, "reason": "near_duplicate"}))
  docs = docs | "CountOut" >> beam.ParDo(_Count("out"))
  prefix = FileSystems.join(args.output_dir, "documents")
  _ = (docs
       | "Key" >> beam.Map(lambda d: (shards.stable_hash(d["id"]),
                                      json.dumps(d, ensure_ascii=False,
                                                 sort_keys=True).encode("utf-8")))
       | "WriteShards" >> shards.WriteShards(prefix, num_shards=args.num_shards, fmt="jsonl"))
  if rejected:
    from pipelines.transforms.clean import SummarizeRejections
    _ = ((tuple(rejected) | "AllRejected" >> beam.Flatten())
         | "Summarize" >> SummarizeRejections(max_samples=5)
         | "WriteRejections" >> beam.Map(
             lambda obj, path: jobs.write_json(path, obj),
             FileSystems.join(args.output_dir, "rejections.json")))


def stats_from_counters(counters: dict[str, int]) -> dict:
  """Per-source document and byte counts, and the other counters, of a finished job."""
  out: dict = {"in": {}, "out": {}, "counters": {}}
  for key, value in counters.items():
    ns, _, name = key.partition("/")
    if ns in ("palmflow.in", "palmflow.out"):
      what, _, src = name.partition("[")
      out[ns.split(".")[1]].setdefault(src.rstrip("]"), {})[what] = value
    else:
      out["counters"][key] = value
  return out


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sources", required=True, help="JSON list of source specs")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--num_shards", type=int, default=4)
  parser.add_argument("--normalize", default="NFC",
                      help="Unicode form, or '' for none (NULs are removed either way)")
  parser.add_argument("--filters", default="", help="JSON FilterConfig fields")
  parser.add_argument("--dedup", default="none", choices=["none", "exact", "near",
                                                          "exact+near"])
  parser.add_argument("--near_dedup", default="", help="JSON NearDedup arguments")
  args, beam_args = parser.parse_known_args(argv)
  return args, jobs.reject_unknown_flags(parser, beam_args)


def run(argv=None) -> dict:
  """Runs the job; returns the stats it also writes to `<output_dir>/stats.json`."""
  args, beam_args = parse_args(argv)
  p = jobs.make_pipeline(beam_args)
  build(p, args)
  counters = jobs.run_and_count(p)
  if counters is None:  # --dry_run: the job graph was built and nothing ran
    return {}
  stats = stats_from_counters(counters)
  rej_path = FileSystems.join(args.output_dir, "rejections.json")
  if FileSystems.exists(rej_path):
    with FileSystems.open(rej_path) as f:
      stats["rejections"] = json.loads(f.read())
  stats["documents_in"] = sum(v.get("docs", 0) for v in stats.get("in", {}).values())
  stats["documents_out"] = sum(v.get("docs", 0) for v in stats.get("out", {}).values())
  stats["bytes_out"] = sum(v.get("bytes", 0) for v in stats.get("out", {}).values())
  stats["shard_pattern"] = shards.shard_pattern(
      FileSystems.join(args.output_dir, "documents"), args.num_shards, "jsonl")
  jobs.write_json(FileSystems.join(args.output_dir, STATS), stats)
  return stats


if __name__ == "__main__":
  logging.getLogger().setLevel(logging.INFO)
  # run through the importable module, not this `__main__` copy of it: the job's classes
  # then pickle by reference (`pipelines.corpus.X`), which the workers can import
  from pipelines import corpus as job
  job.run()
