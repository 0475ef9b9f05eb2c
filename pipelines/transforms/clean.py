"""Normalize and filter documents (``{"id", "text", "source", ...}`` dicts) in Beam.

``Normalize`` rewrites the text (Unicode normal form, NULs removed, CRLF/CR -> LF); ``Filter``
splits docs into ``kept`` (main output) and ``rejected`` (``{"id", "reason"}``) by the quality
rules of a frozen :class:`FilterConfig`, counting each reason in
``Metrics.counter("palmflow.filter", f"rejected_{reason}")``; ``SummarizeRejections`` turns
rejection (or dedup removal) records into one ``{reason: {"count", "sample_ids"}}`` dict for
``stats.json``.

Runnable example (from the repository root)::

    .venv/bin/python -c "
    import apache_beam as beam
    from pipelines.transforms.clean import Filter, FilterConfig, Normalize, SummarizeRejections
    docs = [{'id': 'a', 'text': 'Cafe\\u0301 au lait.', 'source': 's'},
            {'id': 'b', 'text': '12345', 'source': 's'}]
    with beam.Pipeline(runner='DirectRunner') as p:
        out = (p | beam.Create(docs) | Normalize()
                 | Filter(FilterConfig(min_chars=3, min_alpha_fraction=0.5)))
        out.kept | 'Kept' >> beam.Map(print)
        out.rejected | SummarizeRejections() | 'Stats' >> beam.Map(print)
    "
"""

from __future__ import annotations

import dataclasses
import heapq
import unicodedata
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

REJECTED = "rejected"
_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


class Normalize(beam.PTransform):
  """docs -> docs with normalized text; other keys are kept as they are."""

  def __init__(self, form: str | None = "NFC", *, remove_nul: bool = True,
               unify_newlines: bool = True):
    """Args:
      form: a ``unicodedata`` normal form (NFC, NFD, NFKC, NFKD), or None to skip it.
      remove_nul: delete NUL characters (counted in ``palmflow.normalize/nul_docs_cleaned``).
      unify_newlines: turn ``\\r\\n`` and lone ``\\r`` into ``\\n``.

    Raises:
      ValueError: for an unknown form.
    """
    super().__init__()
    if form is not None and form not in _FORMS:
      raise ValueError(f"Normalize: form {form!r} is not one of {_FORMS} (or None)")
    self._form, self._remove_nul, self._newlines = form, remove_nul, unify_newlines

  def expand(self, docs):
    return docs | "NormalizeText" >> beam.ParDo(
        _NormalizeFn(self._form, self._remove_nul, self._newlines))


class _NormalizeFn(beam.DoFn):
  def __init__(self, form, remove_nul, unify_newlines):
    self._form, self._remove_nul, self._newlines = form, remove_nul, unify_newlines
    self._nul = Metrics.counter("palmflow.normalize", "nul_docs_cleaned")
    self._changed = Metrics.counter("palmflow.normalize", "docs_changed")

  def process(self, doc):
    text = original = doc["text"]
    if self._remove_nul and "\x00" in text:
      text = text.replace("\x00", "")
      self._nul.inc()
    if self._newlines and "\r" in text:
      text = text.replace("\r\n", "\n").replace("\r", "\n")
    if self._form:
      text = unicodedata.normalize(self._form, text)
    if text == original:
      yield doc
    else:
      self._changed.inc()
      yield {**doc, "text": text}


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  """Quality rules of :class:`Filter`; the defaults keep every document.

  Rules are checked in field order and the first failing one names the rejection reason.
  """

  min_chars: int = 0
  """Reject docs with fewer characters (after stripping surrounding whitespace): ``too_short``.
  Whitespace-only docs are always rejected as ``empty``."""
  max_chars: int | None = None
  """Reject docs with more characters than this: ``too_long``. None: no limit."""
  min_alpha_fraction: float = 0.0
  """Reject docs whose alphabetic characters are a smaller fraction of their non-whitespace
  characters: ``low_alpha_fraction`` (catches tables, code dumps, numbers)."""
  max_repeated_line_fraction: float = 1.0
  """Reject docs where more than this fraction of non-blank lines repeat an earlier line (after
  stripping): ``repeated_lines`` (catches boilerplate and scraping loops)."""
  max_line_length: int | None = None
  """Reject docs with any line longer than this many characters: ``line_too_long``."""

  def __post_init__(self):
    problems = []
    if self.min_chars < 0:
      problems.append("min_chars must be >= 0")
    if self.max_chars is not None and self.max_chars < max(self.min_chars, 1):
      problems.append("max_chars must be >= max(min_chars, 1) or None")
    if not 0.0 <= self.min_alpha_fraction <= 1.0:
      problems.append("min_alpha_fraction must be in [0, 1]")
    if not 0.0 <= self.max_repeated_line_fraction <= 1.0:
      problems.append("max_repeated_line_fraction must be in [0, 1]")
    if self.max_line_length is not None and self.max_line_length < 1:
      problems.append("max_line_length must be >= 1 or None")
    if problems:
      raise ValueError(f"FilterConfig{dataclasses.astuple(self)}: " + "; ".join(problems))


def rejection_reason(text: str, config: FilterConfig) -> str | None:
  """Returns why ``text`` fails ``config`` (a reason name), or None when it is kept."""
  stripped = text.strip()
  if not stripped:
    return "empty"
  if len(stripped) < config.min_chars:
    return "too_short"
  if config.max_chars is not None and len(text) > config.max_chars:
    return "too_long"
  if config.min_alpha_fraction > 0.0:
    visible = [c for c in text if not c.isspace()]
    alpha = sum(c.isalpha() for c in visible)
    if alpha < config.min_alpha_fraction * len(visible):
      return "low_alpha_fraction"
  if config.max_repeated_line_fraction < 1.0:
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    repeated = len(lines) - len(set(lines))
    if repeated > config.max_repeated_line_fraction * len(lines):
      return "repeated_lines"
  if config.max_line_length is not None:
    if any(len(line) > config.max_line_length for line in text.splitlines()):
      return "line_too_long"
  return None


class _FilterFn(beam.DoFn):
  def __init__(self, config: FilterConfig):
    self._config = config
    self._kept = Metrics.counter("palmflow.filter", "kept")

  def process(self, doc):
    reason = rejection_reason(doc["text"], self._config)
    if reason is None:
      self._kept.inc()
      yield doc
    else:
      Metrics.counter("palmflow.filter", f"rejected_{reason}").inc()
      yield beam.pvalue.TaggedOutput(REJECTED, {"id": doc["id"], "reason": reason})


class Filter(beam.PTransform):
  """docs -> outputs ``kept`` (main: the docs that pass) and ``rejected`` (``{"id", "reason"}``).

  Use ``out = docs | Filter(config)``, then ``out.kept`` and ``out.rejected``.
  """

  def __init__(self, config: FilterConfig = FilterConfig()):
    super().__init__()
    if not isinstance(config, FilterConfig):
      raise TypeError(f"Filter expects a FilterConfig, got {type(config).__name__}")
    self._config = config

  def expand(self, docs):
    return docs | "ApplyRules" >> beam.ParDo(_FilterFn(self._config)).with_outputs(
        REJECTED, main="kept")


class _ReasonStats(beam.CombineFn):
  """Per reason: (count, the ``max_samples`` smallest ids)."""

  def __init__(self, max_samples: int):
    self._k = max_samples

  def create_accumulator(self):
    return 0, []

  def add_input(self, acc, record_id):
    count, ids = acc
    return count + 1, heapq.nsmallest(self._k, ids + [record_id])

  def merge_accumulators(self, accs):
    accs = list(accs)
    ids = [i for _, sample in accs for i in sample]
    return sum(c for c, _ in accs), heapq.nsmallest(self._k, ids)

  def extract_output(self, acc):
    count, ids = acc
    return {"count": count, "sample_ids": sorted(ids)}


class SummarizeRejections(beam.PTransform):
  """``{"id", "reason", ...}`` records -> one dict ``{reason: {"count": n, "sample_ids": [..]}}``.

  ``sample_ids`` are the ``max_samples`` smallest ids of each reason (deterministic). An empty
  input gives ``{}``. Works on ``Filter`` rejections and dedup removals alike.
  """

  def __init__(self, max_samples: int = 5):
    super().__init__()
    if max_samples < 0:
      raise ValueError(f"SummarizeRejections: max_samples must be >= 0, got {max_samples}")
    self._max_samples = max_samples

  def expand(self, records):
    return (records
            | "ByReason" >> beam.Map(_reason_and_id)
            | "PerReason" >> beam.CombinePerKey(_ReasonStats(self._max_samples))
            | "ToDict" >> beam.combiners.ToDict()
            | "SortReasons" >> beam.Map(lambda stats: dict(sorted(stats.items()))))


def _reason_and_id(record: dict[str, Any]) -> tuple[str, str]:
  return record["reason"], record["id"]
