"""Exact and near-duplicate removal for ``{"id", "text", "source", ...}`` docs, in plain Beam.

Both transforms return three outputs: ``kept`` (main: the docs that survive), ``removed`` (the
ids of dropped docs, strings) and ``duplicates`` (one ``{"id", "reason", "duplicate_of", ...}``
record per dropped doc, the shape ``clean.SummarizeRejections`` reads). Every decision depends
only on ids and text, never on bundle order or worker, so reruns give the same result: in a group
of duplicates the doc with the smallest id is kept.

* ``ExactDedup``: groups docs by a hash of their lower-cased, whitespace-collapsed text.
* ``NearDedup``: MinHash over word (or character) shingles, LSH banding into candidate pairs,
  verification of each pair by the *exact* Jaccard similarity of the two shingle sets, then a doc
  is dropped when it has a verified neighbour (Jaccard >= threshold) with a smaller id.

MinHash uses the universal family ``h_i(x) = (a_i * x + b_i) mod (2**31 - 1)`` with ``a_i, b_i``
derived from ``seed`` by BLAKE2b (stable across machines and library versions), evaluated with
numpy without overflow (every product is below 2**62).

Runnable example (from the repository root)::

    .venv/bin/python -c "
    import apache_beam as beam
    from pipelines.transforms.dedup import ExactDedup, NearDedup
    text = 'call me ishmael some years ago never mind how long precisely having little money'
    docs = [{'id': 'a', 'text': text, 'source': 's'},
            {'id': 'b', 'text': text.upper(), 'source': 's'},
            {'id': 'c', 'text': text.replace('money', 'cash'), 'source': 's'}]
    with beam.Pipeline(runner='DirectRunner') as p:
        exact = p | beam.Create(docs) | ExactDedup()
        near = exact.kept | NearDedup(threshold=0.7)
        near.kept | 'Kept' >> beam.Map(print)
        (exact.duplicates, near.duplicates) | beam.Flatten() | 'Removed' >> beam.Map(print)
    "
"""

from __future__ import annotations

import hashlib
import re

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

REMOVED = "removed"
DUPLICATES = "duplicates"
MERSENNE_31 = (1 << 31) - 1
_WORD = re.compile(r"\w+")
_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def normalized_text(text: str) -> str:
  """Lower-cases and collapses whitespace: the text ``ExactDedup`` compares."""
  return " ".join(text.lower().split())


def _key_by_content(doc):
  digest = hashlib.blake2b(normalized_text(doc["text"]).encode("utf-8"), digest_size=16)
  return digest.digest(), doc


class _KeepSmallestIdFn(beam.DoFn):
  def __init__(self):
    self._removed = Metrics.counter("palmflow.dedup", "exact_duplicates_removed")

  def process(self, group):
    _, docs = group
    # Two passes over the grouped iterable, so a huge group is never held in memory.
    keep_index, keep = min(enumerate(docs), key=lambda item: (item[1]["id"], item[0]))
    yield keep
    for index, doc in enumerate(docs):
      if index != keep_index:
        self._removed.inc()
        yield beam.pvalue.TaggedOutput(REMOVED, doc["id"])
        yield beam.pvalue.TaggedOutput(DUPLICATES, {
            "id": doc["id"], "reason": "exact_duplicate", "duplicate_of": keep["id"]})


class ExactDedup(beam.PTransform):
  """docs -> ``kept`` (main), ``removed`` (ids), ``duplicates`` (records); keeps the smallest
  id of each group of identical texts.

  Texts are identical when equal after lower-casing and collapsing whitespace. Each removal
  counts in ``Metrics.counter("palmflow.dedup", "exact_duplicates_removed")``.
  """

  def expand(self, docs):
    return (docs
            | "HashText" >> beam.Map(_key_by_content)
            | "GroupByText" >> beam.GroupByKey()
            | "KeepSmallestId" >> beam.ParDo(_KeepSmallestIdFn()).with_outputs(
                REMOVED, DUPLICATES, main="kept"))


def _mix64(h: np.ndarray) -> np.ndarray:
  """The splitmix64 finalizer, vectorised (uint64 arithmetic wraps modulo 2**64)."""
  h = (h ^ (h >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
  h = (h ^ (h >> _U64(27))) * _U64(0x94D049BB133111EB)
  return h ^ (h >> _U64(31))


def shingle_hashes(text: str, shingle_size: int = 5, unit: str = "word") -> np.ndarray:
  """Returns the sorted unique 64-bit hashes of a text's shingles.

  Args:
    text: any text; it is lower-cased, and for ``unit="word"`` split into ``\\w+`` words
      (punctuation dropped), for ``unit="char"`` whitespace-collapsed into characters.
    shingle_size: tokens per shingle; a text with fewer tokens is one shingle.
    unit: "word" or "char".

  Returns:
    A sorted ``uint64`` array, empty for a text without tokens.
  """
  lowered = text.lower()
  tokens = _WORD.findall(lowered) if unit == "word" else list(" ".join(lowered.split()))
  if not tokens:
    return np.zeros(0, dtype=_U64)
  vocab: dict[str, int] = {}
  for token in tokens:
    if token not in vocab:
      digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
      vocab[token] = int.from_bytes(digest, "little")
  ids = np.fromiter((vocab[t] for t in tokens), dtype=_U64, count=len(tokens))
  size = min(shingle_size, len(tokens))
  count = len(tokens) - size + 1
  h = np.zeros(count, dtype=_U64)
  for j in range(size):  # Order-sensitive polynomial combination, then mixing.
    h = _mix64(h * _U64(0x9E3779B97F4A7C15) + ids[j: j + count])
  return np.unique(h)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
  """Exact Jaccard similarity of two sorted unique hash arrays (0.0 when both are empty)."""
  inter = np.intersect1d(a, b, assume_unique=True).size
  union = a.size + b.size - inter
  return inter / union if union else 0.0


def minhash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The ``(a, b)`` coefficients of the hash family, derived from ``seed`` by BLAKE2b."""
  def draw(i: int, name: str, low: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{i}:{name}".encode(), digest_size=8).digest()
    return low + int.from_bytes(digest, "little") % (MERSENNE_31 - low)
  a = np.array([draw(i, "a", 1) for i in range(num_perm)], dtype=_U64)
  b = np.array([draw(i, "b", 0) for i in range(num_perm)], dtype=_U64)
  return a, b


def minhash_signature(shingles: np.ndarray, a: np.ndarray, b: np.ndarray,
                      chunk: int = 4096) -> np.ndarray:
  """MinHash signature (``uint64`` values < 2**31, one per hash function) of a non-empty set."""
  x = shingles % _U64(MERSENNE_31)
  sig = np.full(a.shape, MERSENNE_31, dtype=_U64)
  for start in range(0, x.size, chunk):  # Bounded memory for very long documents.
    part = x[start: start + chunk]
    values = (a[:, None] * part[None, :] + b[:, None]) % _U64(MERSENNE_31)
    np.minimum(sig, values.min(axis=1), out=sig)
  return sig


def lsh_params(num_perm: int, threshold: float, bands: int | None = None,
               rows: int | None = None, target: float = 0.99) -> tuple[int, int]:
  """Chooses ``(bands, rows)`` with ``bands * rows <= num_perm``.

  Given one of them, the other is ``num_perm // given``. Given neither, picks the largest
  ``rows`` (fewest false candidates) for which a pair at exactly ``threshold`` similarity
  becomes a candidate with probability ``1 - (1 - threshold**rows)**bands >= target``.

  Raises:
    ValueError: when the given values do not fit in ``num_perm``.
  """
  if bands and rows:
    pass
  elif bands or rows:
    bands, rows = bands or num_perm // rows, rows or num_perm // bands
  else:
    for rows in range(num_perm, 0, -1):
      bands = num_perm // rows
      if 1.0 - (1.0 - threshold ** rows) ** bands >= target:
        break
  if not bands or not rows or bands * rows > num_perm:
    raise ValueError(f"NearDedup: bands={bands} x rows={rows} must be >= 1 each and use at "
                     f"most num_perm={num_perm} hash functions")
  return bands, rows


class _SketchFn(beam.DoFn):
  """doc -> main ``(id, shingle hashes as bytes)``; tagged ``buckets``: ``(bucket, id)``."""

  def __init__(self, shingle_size, unit, num_perm, bands, rows, seed):
    self._args = shingle_size, unit
    self._num_perm, self._bands, self._rows, self._seed = num_perm, bands, rows, seed
    self._coefs = None

  def setup(self):
    self._coefs = minhash_params(self._num_perm, self._seed)

  def process(self, doc):
    shingles = shingle_hashes(doc["text"], *self._args)
    if not shingles.size:
      return
    yield doc["id"], shingles.tobytes()
    sig = minhash_signature(shingles, *self._coefs).astype("<u4")
    for band in range(self._bands):
      rows = sig[band * self._rows: (band + 1) * self._rows].tobytes()
      bucket = hashlib.blake2b(band.to_bytes(4, "little") + rows, digest_size=12)
      yield beam.pvalue.TaggedOutput("buckets", (bucket.digest(), doc["id"]))


class _CandidatePairsFn(beam.DoFn):
  """``(bucket, ids)`` -> ``(smaller id, larger id)`` pairs sharing the bucket."""

  def __init__(self, max_bucket_size):
    self._max = max_bucket_size
    self._oversized = Metrics.counter("palmflow.dedup", "near_oversized_buckets")

  def process(self, group):
    ids = sorted(set(group[1]))
    if len(ids) > self._max:  # Quadratic blow-up guard: compare with the smallest only.
      self._oversized.inc()
      yield from ((ids[0], other) for other in ids[1:])
      return
    for i, left in enumerate(ids):
      for right in ids[i + 1:]:
        yield left, right


def _attach_left(joined):
  """(left id, {"pairs": [right ids], "shingles": [bytes]}) -> (right, (left, shingles))."""
  left, parts = joined
  shingles = parts["shingles"][0]
  for right in parts["pairs"]:
    yield right, (left, shingles)


class _VerifyFn(beam.DoFn):
  """(right id, {"lefts": [(left, shingles)], "shingles": [bytes]}) -> (right, (left, J))."""

  def __init__(self, threshold):
    self._threshold = threshold
    self._candidates = Metrics.counter("palmflow.dedup", "near_candidate_pairs")
    self._verified = Metrics.counter("palmflow.dedup", "near_verified_pairs")

  def process(self, joined):
    right, parts = joined
    right_set = np.frombuffer(parts["shingles"][0], dtype=_U64)
    for left, left_bytes in parts["lefts"]:
      self._candidates.inc()
      similarity = jaccard(np.frombuffer(left_bytes, dtype=_U64), right_set)
      if similarity >= self._threshold:
        self._verified.inc()
        yield right, (left, similarity)


class _DropMatchedFn(beam.DoFn):
  """(id, {"docs": [doc], "matches": [(smaller id, J)]}) -> kept doc, or removed id + record."""

  def __init__(self):
    self._removed = Metrics.counter("palmflow.dedup", "near_duplicates_removed")

  def process(self, joined):
    doc_id, parts = joined
    matches = list(parts["matches"])
    for doc in parts["docs"]:
      if not matches:
        yield doc
        continue
      left, similarity = min(matches)
      self._removed.inc()
      yield beam.pvalue.TaggedOutput(REMOVED, doc_id)
      yield beam.pvalue.TaggedOutput(DUPLICATES, {
          "id": doc_id, "reason": "near_duplicate", "duplicate_of": left,
          "jaccard": round(float(similarity), 4)})


class NearDedup(beam.PTransform):
  """docs -> ``kept`` (main), ``removed`` (ids), ``duplicates`` (records): drops each doc that
  has a near duplicate with a smaller id.

  Ids must be unique. ``duplicates`` records are ``{"id", "reason": "near_duplicate",
  "duplicate_of": the smallest verified neighbour, "jaccard": their exact shingle Jaccard}``.
  Counters (namespace ``palmflow.dedup``): ``near_candidate_pairs``, ``near_verified_pairs``,
  ``near_duplicates_removed``, ``near_oversized_buckets``. Docs without tokens are kept.
  """

  def __init__(self, shingle_size: int = 5, num_perm: int = 128, bands: int | None = None,
               rows: int | None = None, threshold: float = 0.8, seed: int = 0, *,
               unit: str = "word", max_bucket_size: int = 200):
    """Args:
      shingle_size: tokens per shingle (words, or characters with ``unit="char"``).
      num_perm: MinHash functions per signature.
      bands, rows: LSH banding; derived by :func:`lsh_params` when omitted.
      threshold: minimum exact Jaccard similarity of shingle sets for a near duplicate.
      seed: seed of the hash family (part of the stage's semantic config).
      unit: "word" or "char" shingles.
      max_bucket_size: a bucket with more ids only pairs them with its smallest id.

    Raises:
      ValueError: for out-of-range arguments.
    """
    super().__init__()
    if shingle_size < 1 or num_perm < 1 or not 0.0 < threshold <= 1.0 or max_bucket_size < 2:
      raise ValueError("NearDedup: need shingle_size >= 1, num_perm >= 1, 0 < threshold <= "
                       f"1, max_bucket_size >= 2; got {shingle_size}, {num_perm}, "
                       f"{threshold}, {max_bucket_size}")
    if unit not in ("word", "char"):
      raise ValueError(f"NearDedup: unit must be 'word' or 'char', got {unit!r}")
    self.bands, self.rows = lsh_params(num_perm, threshold, bands, rows)
    self._sketch = _SketchFn(shingle_size, unit, num_perm, self.bands, self.rows, seed)
    self._threshold, self._max_bucket_size = threshold, max_bucket_size

  def expand(self, docs):
    sketches = docs | "Sketch" >> beam.ParDo(self._sketch).with_outputs("buckets",
                                                                           main="shingles")
    shingles = sketches.shingles
    pairs = (sketches.buckets
             | "GroupByBucket" >> beam.GroupByKey()
             | "CandidatePairs" >> beam.ParDo(_CandidatePairsFn(self._max_bucket_size))
             | "UniquePairs" >> beam.Distinct())
    matches = ({"pairs": pairs, "shingles": shingles}
               | "JoinLeft" >> beam.CoGroupByKey()
               | "KeyByRight" >> beam.FlatMap(_attach_left))
    verified = ({"lefts": matches, "shingles": shingles}
                | "JoinRight" >> beam.CoGroupByKey()
                | "Verify" >> beam.ParDo(_VerifyFn(self._threshold)))
    keyed = docs | "KeyById" >> beam.Map(lambda doc: (doc["id"], doc))
    return ({"docs": keyed, "matches": verified}
            | "JoinDocs" >> beam.CoGroupByKey()
            | "DropMatched" >> beam.ParDo(_DropMatchedFn()).with_outputs(
                REMOVED, DUPLICATES, main="kept"))
