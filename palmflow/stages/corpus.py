"""`corpus`: read named sources, clean, dedup and write JSONL document shards (a Beam job)."""
from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

from palmflow.dag.kinds import StageKind, register, setting
from palmflow.stages.common import (beam_args, beam_summary, path_identity,
                                    remote_path_identity)

FORMATS = ("python_stdlib", "text", "jsonl", "csv", "tsv", "parquet", "tfrecord", "tfds")


@dataclasses.dataclass(frozen=True)
class CorpusSettings:
  sources: list[dict[str, Any]] = setting(
      doc="named sources, e.g. {name: stdlib, format: python_stdlib} or {name: books, "
          "format: text, path: 'data/*.txt.gz', unit: file}; formats: " + ", ".join(FORMATS))
  normalize: str = setting("NFC", doc="Unicode normalization form (NFC, NFKC, ...; '' = none); "
                           "NULs are removed and newlines unified either way")
  filters: dict[str, Any] = setting(
      default_factory=dict, doc="FilterConfig fields: min_chars, max_chars, "
      "min_alpha_fraction, max_repeated_line_fraction, max_line_length")
  dedup: str = setting("none", doc="none | exact | near | exact+near")
  near_dedup: dict[str, Any] = setting(
      default_factory=dict, doc="NearDedup arguments: shingle_size, num_perm, bands, "
      "threshold, seed")
  num_shards: int = setting(4, doc="number of output shards")

  def validate(self):
    names = set()
    for i, s in enumerate(self.sources):
      if "name" not in s or "format" not in s:
        raise ValueError(f"sources.{i}: each source needs 'name' and 'format'")
      if s["format"] not in FORMATS:
        raise ValueError(f"sources.{i}.format: unknown format {s['format']!r} "
                         f"(known: {', '.join(FORMATS)})")
      if s["name"] in names:
        raise ValueError(f"sources.{i}.name: duplicate source name {s['name']!r}")
      names.add(s["name"])
      _check_source(i, s)
    if self.dedup not in ("none", "exact", "near", "exact+near"):
      raise ValueError(f"dedup: {self.dedup!r} is not one of none, exact, near, exact+near")
    if self.num_shards < 1:
      raise ValueError("num_shards: must be at least 1")
    # What the Beam job would reject only once it is built, checked when the file is loaded.
    from pipelines.transforms.clean import FilterConfig, Normalize
    from pipelines.transforms.dedup import NearDedup
    if self.normalize:
      try:
        Normalize(form=self.normalize)
      except ValueError as e:
        raise ValueError(f"normalize: {e}") from None
    for field, make in (("filters", FilterConfig), ("near_dedup", NearDedup)):
      values = getattr(self, field)
      if not isinstance(values, dict):
        raise ValueError(f"{field}: expected a mapping, got {values!r}")
      try:
        make(**values)
      except TypeError as e:
        known = list(inspect.signature(make).parameters)
        bad = [k for k in values if k not in known]
        raise ValueError(f"{field}: unknown key(s) {bad or e}; known: "
                         f"{', '.join(known)}") from None
      except ValueError as e:
        raise ValueError(f"{field}: {e}") from None


def _check_source(i: int, s: dict) -> None:
  """A source's keys and values, as the Beam job's readers would check them."""
  import difflib
  if s["format"] == "python_stdlib":
    from pipelines.corpus import STDLIB_OPTIONS
    keys = ("name", "format") + STDLIB_OPTIONS
    for key, value in s.items():
      if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        raise ValueError(f"sources.{i}.{key}: unknown key for format 'python_stdlib'"
                         + (f" (did you mean {close[0]!r}?)" if close else
                            f"; known: {', '.join(keys)}"))
      if key in ("include", "exclude") and not (
              isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"sources.{i}.{key}: expected a list of glob patterns, e.g. "
                         f"[{value!r}], got {value!r}")
    return
  from pipelines.transforms.ingest import SourceSpec
  if "keep_fields" in s and not isinstance(s["keep_fields"], list):
    raise ValueError(f"sources.{i}.keep_fields: expected a list of field names, got "
                     f"{s['keep_fields']!r}")
  try:
    SourceSpec.from_dict(s)
  except (ValueError, TypeError) as e:
    raise ValueError(f"sources.{i}: {e}") from None


@register
class Corpus(StageKind):
  kind = "corpus"
  version = "2"  # 2: empty documents are rejected ('empty') without filters too
  runs_beam = True
  produces = "documents"
  settings_cls = CorpusSettings
  doc = "Beam: read sources, normalize, filter, dedup -> JSONL document shards + stats.json"

  def identity(self, settings, *, base_dir):
    ident = dataclasses.asdict(settings)
    srcs = []
    for s in settings.sources:
      s = dict(s)
      if s["format"] == "python_stdlib":
        from pipelines.transforms.stdlib import python_version
        s["python_version"] = python_version()
      elif "path" in s and "://" not in s["path"]:
        s["content"] = path_identity(base_dir, s["path"])
      elif "path" in s:
        s["content"] = remote_path_identity(s["path"])
      elif s["format"] == "tfds" and s.get("data_dir"):
        # The prepared dataset's info files (versions, splits, shard sizes): a dataset
        # prepared again, or a newer version picked by an unpinned name, reruns the stage.
        name = str(s.get("dataset", "")).split("/")[0]
        pattern = f"{s['data_dir'].rstrip('/')}/{name}/**/dataset_info.json"
        s["content"] = (remote_path_identity(pattern) if "://" in s["data_dir"]
                        else path_identity(base_dir, pattern))
      srcs.append(s)
    ident["sources"] = srcs
    if not settings.normalize:
      # Since NULs are removed and newlines unified without a Unicode form too, corpora
      # built with normalize '' before then (which kept both) are not reused.
      ident["cleaned_without_form"] = True
    return ident

  def run(self, ctx):
    from pipelines import corpus as job
    from palmflow.dag.executor import resolve_path
    s = ctx.settings
    sources = []
    for src in s.sources:
      src = dict(src)
      if "path" in src and "://" not in src["path"]:
        src["path"] = str(resolve_path(ctx.base_dir, src["path"]))
      sources.append(src)
    argv = [f"--sources={json.dumps(sources)}", f"--output_dir={ctx.out_dir}",
            f"--num_shards={s.num_shards}", f"--normalize={s.normalize}",
            f"--filters={json.dumps(s.filters) if s.filters else ''}",
            f"--dedup={s.dedup}", f"--near_dedup={json.dumps(s.near_dedup)}"]
    ctx.log(f"Beam job pipelines.corpus on {beam_summary(ctx.placement)}")
    stats = job.run(argv + beam_args(ctx.placement, job_name=f"{ctx.pipeline}-{ctx.name}"))
    ctx.log(f"{stats['documents_in']} documents in, {stats['documents_out']} out, "
            f"{stats['bytes_out'] / 1e6:.1f} MB")
    if not stats["documents_out"]:
      # Every later stage would fail far from the cause (an empty vocabulary sample, a task
      # with no blocks): stop here, with what was read and why it was dropped.
      from palmflow.errors import DataError
      raise DataError(
          f"no document left ({stats['documents_in']} read; rejected by "
          f"reason: {stats.get('rejections') or 'none'}; see {ctx.out_dir / 'stats.json'})")
    return {"documents": stats["documents_out"], "bytes": stats["bytes_out"],
            "shard_pattern": stats["shard_pattern"]}
