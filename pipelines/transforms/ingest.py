"""Read named document sources into one PCollection of ``{"id", "text", "source"}`` dicts.

A source is a dict (usually one entry of a pipeline file) naming a format and where to read it::

    {"name": "shakespeare", "format": "text", "unit": "paragraph",
     "path": "../shared/data/tiny_shakespeare/input.txt"}

Formats and their keys (besides ``name``, ``format``, ``path``, ``strip_gutenberg``):
  text      ``unit``: ``file`` (default), ``line`` or ``paragraph`` (blank-line separated).
  jsonl     ``text_field`` ("text"), ``id_field`` (None), ``keep_fields`` (()).
  csv, tsv  ``text_column`` (name or 0-based index; "text"), ``has_header`` (True), ``delimiter``
            ("," / tab), ``quoting`` (csv True, tsv False), ``keep_fields``.
  parquet   ``text_column`` ("text"), ``keep_fields``.
  tfrecord  ``text_feature`` ("text"): a bytes feature of serialized ``tf.train.Example`` records.
  tfds      ``dataset`` ("name[/config][/version]"), ``split`` ("train"), ``text_key`` ("text"),
            ``data_dir`` (a prepared TFDS directory; nothing is downloaded), no ``path``.

``path`` may be a glob (``*``, ``?``, ``[...]``, ``**``) on any Beam filesystem; ``.gz`` and other
compressed files are decompressed by extension. Ids are deterministic and independent of where the
data lives: ``f"{source}:{file relative to the glob's base directory}:{key}"``, where ``key`` is the
1-based line number for line-oriented units (text lines, paragraphs by their first line, jsonl
lines; or the record's ``id_field`` value), the 0-based record index for csv/tsv/parquet/tfrecord
rows and TFDS examples, and 0 for ``unit: file``.

Bad bytes never fail the job: text is decoded as UTF-8 with replacement characters, and such a doc
gets ``"had_invalid_utf8": True`` and counts in ``Metrics.counter("palmflow",
"invalid_utf8_docs")``; a doc containing NUL gets ``"had_nul_bytes": True`` and counts in
``"nul_bytes_docs"`` (``clean.Normalize`` removes NULs). Malformed records are skipped and counted
in ``"malformed_records"``. A path matching nothing raises :class:`SourceNotFoundError`.

Runnable example (from the repository root)::

    .venv/bin/python -c "
    import apache_beam as beam; from pipelines.transforms.ingest import ReadSources
    spec = {'name': 'shakespeare', 'format': 'text', 'unit': 'paragraph',
            'path': '../shared/data/tiny_shakespeare/input.txt'}
    with beam.Pipeline(runner='DirectRunner') as p:
        p | ReadSources([spec]) | beam.combiners.Sample.FixedSizeGlobally(2) | beam.Map(print)"
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import itertools
import json
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines.transforms import jobs

_COMMON_KEYS = ("name", "format", "path", "strip_gutenberg")
_FORMAT_KEYS = {
    "text": ("unit",),
    "jsonl": ("text_field", "id_field", "keep_fields"),
    "csv": ("text_column", "has_header", "delimiter", "quoting", "keep_fields"),
    "tsv": ("text_column", "has_header", "delimiter", "quoting", "keep_fields"),
    "parquet": ("text_column", "keep_fields"),
    "tfrecord": ("text_feature",),
    "tfds": ("dataset", "split", "text_key", "data_dir", "examples_per_shard"),
}
_UNITS = ("file", "line", "paragraph")
_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")


class SourceSpecError(ValueError):
  """A source spec is malformed (unknown key, bad value); the message names the source."""


class SourceNotFoundError(FileNotFoundError):
  """A source's path or glob matches no file."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One named source; build it with :meth:`from_dict`. Field meanings: see the module doc."""

  name: str
  format: str
  path: str | None = None
  strip_gutenberg: bool = False
  unit: str = "file"
  text_field: str = "text"
  id_field: str | None = None
  text_column: str | int = "text"
  has_header: bool = True
  delimiter: str | None = None
  quoting: bool | None = None
  keep_fields: tuple[str, ...] = ()
  text_feature: str = "text"
  dataset: str | None = None
  split: str = "train"
  text_key: str = "text"
  data_dir: str | None = None
  examples_per_shard: int = 10_000

  @classmethod
  def from_dict(cls, spec: Mapping[str, Any] | SourceSpec) -> SourceSpec:
    """Validates a dict spec.

    Raises:
      SourceSpecError: naming the source, the bad key and the closest valid keys.
    """
    if isinstance(spec, SourceSpec):
      return spec
    name = spec.get("name")
    if not isinstance(name, str) or not name or ":" in name:
      raise SourceSpecError(f"source spec {dict(spec)!r}: 'name' must be a non-empty "
                            "string without ':'")
    fmt = spec.get("format")
    if fmt not in _FORMAT_KEYS:
      raise SourceSpecError(f"source {name!r}: format {fmt!r} is not one of "
                            f"{sorted(_FORMAT_KEYS)}")
    allowed = _COMMON_KEYS + _FORMAT_KEYS[fmt]
    for key in spec:
      if key not in allowed:
        close = difflib.get_close_matches(key, allowed, n=3)
        raise SourceSpecError(f"source {name!r}: unknown key {key!r} for format {fmt!r}"
                              f"; closest valid keys: {close or sorted(allowed)}")
    values = dict(spec)
    if "keep_fields" in values:
      values["keep_fields"] = tuple(values["keep_fields"])
    out = cls(**values)
    if fmt == "tfds":
      if not out.dataset or out.path:
        raise SourceSpecError(f"source {name!r}: format 'tfds' needs 'dataset' (and "
                              "'data_dir'), not 'path'")
    elif not out.path:
      raise SourceSpecError(f"source {name!r}: 'path' is required for format {fmt!r}")
    if out.unit not in _UNITS:
      raise SourceSpecError(f"source {name!r}: unit {out.unit!r} is not one of {_UNITS}")
    if fmt in ("csv", "tsv") and not out.has_header and (
            isinstance(out.text_column, str) or out.keep_fields):
      raise SourceSpecError(f"source {name!r}: without a header, 'text_column' must be "
                            "a 0-based column index and 'keep_fields' cannot be used")
    return out


def _resolve(path: str, base_dir: str | None) -> str:
  if "://" in path:
    return path
  return os.path.normpath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(path)))


def match_source_files(spec: SourceSpec, base_dir: str | None = None) -> list[tuple[str, str]]:
  """Lists ``(path, path relative to the glob's base directory)`` for a file source, sorted.

  Raises:
    SourceNotFoundError: when nothing matches, naming the source and the resolved pattern.
  """
  pattern = _resolve(spec.path, base_dir)
  try:
    found = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
  except BeamIOError:
    found = []
  if not found:
    raise SourceNotFoundError(
        f"source {spec.name!r}: path {spec.path!r} (resolved to {pattern!r}) matches no file;"
        " check the path, the glob and the working directory (or pass base_dir)")
  wild = re.search(r"[*?\[]", pattern)
  base = pattern[: wild.start()] if wild else pattern
  base = base[: base.rfind("/") + 1]
  return [(path, path[len(base):] if path.startswith(base) else path) for path in found]


def strip_gutenberg_lines(lines: Sequence[str]) -> tuple[int, int] | None:
  """Returns the ``[lo, hi)`` line range of a Project Gutenberg book's body, or None.

  The body lies between the ``*** START OF THE/THIS PROJECT GUTENBERG ...`` and ``*** END ...``
  marker lines; a "Produced by ..." credits paragraph right after the start marker and an
  "End of (the) Project Gutenberg ..." line right before the end marker are dropped too.
  """
  start = next((i for i, s in enumerate(lines) if _GUTENBERG_START.match(s)), None)
  end = next((i for i, s in enumerate(lines) if i > (start if start is not None else -1)
              and _GUTENBERG_END.match(s)), None)
  if start is None and end is None:
    return None
  lo = 0 if start is None else start + 1
  hi = len(lines) if end is None else end
  i = lo
  while i < hi and not lines[i].strip():
    i += 1
  if i < hi and _GUTENBERG_CREDITS.match(lines[i]):
    while i < hi and lines[i].strip():
      i += 1
    lo = i
  j = hi - 1
  while j >= lo and not lines[j].strip():
    j -= 1
  if j >= lo and _GUTENBERG_TRAILER.match(lines[j]):
    hi = j
  return lo, hi


_GUTENBERG_START = re.compile(r"\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG", re.I)
_GUTENBERG_END = re.compile(r"\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG", re.I)
_GUTENBERG_CREDITS = re.compile(r"\s*(Produced|Transcribed|Prepared) by\b", re.I)
_GUTENBERG_TRAILER = re.compile(r"\s*End of (the )?Project Gutenberg", re.I)


def _decode(raw: bytes) -> tuple[str, bool]:
  try:
    return raw.decode("utf-8"), False
  except UnicodeDecodeError:
    return raw.decode("utf-8", errors="replace"), True


def _byte_lines(f) -> Iterator[bytes]:
  first = True
  while line := f.readline():
    if first and line.startswith(_BOM):
      line = line[len(_BOM):]
    first = False
    yield line


class _ReadFn(beam.DoFn):
  """Reads one matched file (or one TFDS shard) of a source and emits docs."""

  def __init__(self, spec: SourceSpec):
    self._spec = spec
    self._invalid = Metrics.counter("palmflow", "invalid_utf8_docs")
    self._nul = Metrics.counter("palmflow", "nul_bytes_docs")
    self._malformed = Metrics.counter("palmflow", "malformed_records")
    self._no_markers = Metrics.counter("palmflow", "gutenberg_markers_missing")

  def process(self, element):
    path, rel = element
    fmt = self._spec.format
    if fmt == "tfds":
      yield from self._tfds(path, rel)
      return
    if fmt == "tfrecord":
      yield from self._tfrecord(path, rel)
      return
    with FileSystems.open(path) as f:
      reader = {"text": self._text, "jsonl": self._jsonl, "csv": self._csv,
                "tsv": self._csv, "parquet": self._parquet}[fmt]
      yield from reader(f, rel)

  def _doc(self, rel, key, text: str, invalid: bool, extra: Mapping[str, Any] | None = None):
    spec = self._spec
    if spec.strip_gutenberg and spec.format != "text":
      lines = text.splitlines(keepends=True)
      text = "".join(lines[self._body(lines)])
    if _SURROGATE.search(text):
      # A lone UTF-16 surrogate (a JSON "\\ud83d" cut from its pair, a TFDS string) is no
      # character: UTF-8 cannot encode it. It becomes U+FFFD like any other bad byte.
      text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
      invalid = True
    doc = dict(extra or {})
    doc.update(id=f"{spec.name}:{rel}:{key}", text=text, source=spec.name)
    if invalid:
      doc["had_invalid_utf8"] = True
      self._invalid.inc()
    if "\x00" in text:
      doc["had_nul_bytes"] = True
      self._nul.inc()
    return doc

  def _body(self, lines: list[str]) -> slice:
    body = strip_gutenberg_lines(lines)
    if body is None:
      self._no_markers.inc()
      return slice(None)
    return slice(*body)

  def _text(self, f, rel):
    spec = self._spec
    lines = [(n, *_decode(raw)) for n, raw in enumerate(_byte_lines(f), 1)]
    if spec.strip_gutenberg:
      lines = lines[self._body([text for _, text, _ in lines])]
    if spec.unit == "file":
      text = "".join(t for _, t, _ in lines)
      if text.strip():
        yield self._doc(rel, 0, text, any(bad for _, _, bad in lines))
      return
    if spec.unit == "line":
      for n, text, bad in lines:
        if text.strip():
          yield self._doc(rel, n, text.rstrip("\r\n"), bad)
      return
    para: list[tuple[int, str, bool]] = []
    for item in lines + [(0, "", False)]:
      if item[1].strip():
        para.append(item)
      elif para:
        text = "".join(t for _, t, _ in para).rstrip("\r\n")
        yield self._doc(rel, para[0][0], text, any(bad for _, _, bad in para))
        para = []

  def _jsonl(self, f, rel):
    spec = self._spec
    for n, raw in enumerate(_byte_lines(f), 1):
      if not raw.strip():
        continue
      line, bad = _decode(raw)
      try:
        record = json.loads(line)
        text = record[spec.text_field]
        key = record[spec.id_field] if spec.id_field else n
      except (ValueError, TypeError, KeyError):
        record, text = None, None
      if not isinstance(text, str):
        self._malformed.inc()
        continue
      yield self._doc(rel, key, text, bad, {k: record.get(k) for k in spec.keep_fields})

  def _csv(self, f, rel):
    spec, tsv = self._spec, self._spec.format == "tsv"
    quoting = not tsv if spec.quoting is None else spec.quoting
    bad_lines: list[bool] = []

    def decoded():
      for raw in _byte_lines(f):
        text, bad = _decode(raw)
        bad_lines.append(bad)
        yield text

    rows = csv.reader(decoded(), delimiter=spec.delimiter or ("\t" if tsv else ","),
                      quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
    header = next(rows, None) if spec.has_header else []
    if header is None:  # an empty file (one of a glob's matches, say) has no rows to read
      return
    column = spec.text_column
    if isinstance(column, str):
      if column not in header:
        raise SourceSpecError(f"source {spec.name!r}, file {rel!r}: text_column {column!r}"
                              f" is not in the header {header}")
      column = header.index(column)
    keep = {k: header.index(k) if k in header else len(header) for k in spec.keep_fields}
    index = 0
    while True:
      bad_lines.clear()  # The reader consumes exactly the lines of one record.
      try:
        row = next(rows)
      except StopIteration:
        return
      except csv.Error:  # E.g. a field longer than csv.field_size_limit().
        self._malformed.inc()
        continue
      if not row:
        continue
      if column < len(row):
        extra = {k: row[i] if i < len(row) else None for k, i in keep.items()}
        yield self._doc(rel, index, row[column], any(bad_lines), extra)
      else:
        self._malformed.inc()
      index += 1

  def _parquet(self, f, rel):
    import pyarrow.parquet as pq

    spec = self._spec
    columns = [spec.text_column, *[k for k in spec.keep_fields if k != spec.text_column]]
    index = 0
    for batch in pq.ParquetFile(f).iter_batches(columns=columns):
      for row in batch.to_pylist():
        yield from self._record(rel, index, row.pop(spec.text_column), row)
        index += 1

  def _tfrecord(self, path, rel):
    import tensorflow as tf

    compression = "GZIP" if path.endswith(".gz") else ""
    records = iter(tf.data.TFRecordDataset(path, compression_type=compression))
    for index in itertools.count():
      try:
        raw = next(records).numpy()
      except StopIteration:
        return
      except tf.errors.DataLossError:  # A truncated or corrupt file: keep what was read.
        self._malformed.inc()
        return
      try:
        feature = tf.train.Example.FromString(raw).features.feature
        value = feature[self._spec.text_feature].bytes_list.value[0]
      except Exception:  # noqa: BLE001 - any undecodable record is counted, not fatal.
        value = None
      yield from self._record(rel, index, value)

  def _tfds(self, shard, rel):
    import tensorflow_datasets as tfds

    spec = self._spec
    start, stop = shard
    builder = tfds.builder(spec.dataset, data_dir=spec.data_dir)
    examples = builder.as_dataset(split=f"{spec.split}[{start}:{stop}]", shuffle_files=False)
    for index, example in enumerate(tfds.as_numpy(examples), start):
      yield from self._record(rel, index, example.get(spec.text_key))

  def _record(self, rel, index, value, extra=None):
    if isinstance(value, bytes):
      yield self._doc(rel, index, *_decode(value), extra)
    elif isinstance(value, str):
      yield self._doc(rel, index, value, False, extra)
    else:
      self._malformed.inc()


def _tfds_shards(spec: SourceSpec) -> list[tuple[tuple[int, int], str]]:
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(spec.dataset, data_dir=spec.data_dir)
    total = builder.info.splits[spec.split].num_examples
  except Exception as e:  # noqa: BLE001 - re-raised with the source named.
    raise SourceNotFoundError(f"source {spec.name!r}: TFDS dataset {spec.dataset!r} split "
                              f"{spec.split!r} not found in data_dir {spec.data_dir!r} "
                              f"(prepare it first; nothing is downloaded): {e}") from e
  size = max(1, spec.examples_per_shard)
  rel = f"{spec.dataset}/{spec.split}"
  return [((a, min(a + size, total)), rel) for a in range(0, total, size)]


class ReadSource(beam.PTransform):
  """PBegin -> docs of one source (see the module docstring)."""

  def __init__(self, spec: Mapping[str, Any] | SourceSpec, *, base_dir: str | None = None,
               validate: bool = True):
    """Args:
      spec: a source dict or :class:`SourceSpec`.
      base_dir: directory that relative local paths are resolved against (default: cwd).
      validate: match the files when the pipeline is built, so a missing path fails before
        anything runs; with False they are matched when the job runs.

    Raises:
      SourceSpecError: for a malformed spec; SourceNotFoundError (on expand) for no match.
    """
    super().__init__()
    self._spec = SourceSpec.from_dict(spec)
    self._base_dir = os.path.abspath(base_dir or os.getcwd())
    self._validate = validate

  def expand(self, pbegin):
    spec, base_dir = self._spec, self._base_dir
    if spec.format == "tfds":
      units = pbegin | "Shards" >> beam.Create(_tfds_shards(spec))
    else:
      if self._validate:
        match_source_files(spec, base_dir)
      units = (pbegin
               | "Pattern" >> beam.Create([spec])
               | "Match" >> beam.FlatMap(match_source_files, base_dir))
    return (units
            | "Spread" >> jobs.Spread()
            | "Parse" >> beam.ParDo(_ReadFn(spec)))


class ReadSources(beam.PTransform):
  """PBegin -> one PCollection of docs from many named sources (names must be unique)."""

  def __init__(self, specs: Iterable[Mapping[str, Any] | SourceSpec], *,
               base_dir: str | None = None, validate: bool = True):
    super().__init__()
    self._specs = [SourceSpec.from_dict(s) for s in specs]
    names = [s.name for s in self._specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or not names:
      raise SourceSpecError(f"source names must be unique and non-empty; got {names}")
    self._base_dir = base_dir
    self._validate = validate

  def expand(self, pbegin):
    docs = [pbegin | f"Read {s.name}" >> ReadSource(s, base_dir=self._base_dir,
                                                     validate=self._validate)
            for s in self._specs]
    return docs | "Merge" >> beam.Flatten()
