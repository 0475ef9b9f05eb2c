"""`dataset`: a labelled downstream dataset as JSONL splits, registered as a seqio task.

Sources:
  - `python_stdlib_packages`: which standard-library package a docstring comes from (a
    labelled set every machine has): inputs are docstrings' first paragraphs, targets the
    top-level package name. Split by module file, so no module is in both splits.
  - `files`: local CSV/TSV/JSONL files (e.g. ../shared/data/glue_sst2/train.tsv) with a text
    field and a label field; `label_names` maps label values to target strings.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from palmflow.dag.kinds import Slot, StageKind, register, setting
from palmflow.dag.store import atomic_path, write_json
from palmflow.errors import DataError
from palmflow.stages.common import path_identity

DEFAULT_PACKAGES = ("asyncio", "email", "http", "json", "logging", "multiprocessing",
                    "unittest", "xml", "importlib", "concurrent", "urllib", "sqlite3")


@dataclasses.dataclass(frozen=True)
class DatasetSettings:
  source: str = setting("python_stdlib_packages", doc="python_stdlib_packages | files")
  packages: list[str] = setting(default_factory=lambda: list(DEFAULT_PACKAGES),
                                doc="python_stdlib_packages: the classes (top-level packages)")
  train_path: str | None = setting(None, doc="files: training file (csv/tsv/jsonl)")
  validation_path: str | None = setting(None, doc="files: validation file; if absent, "
                                                  "validation_fraction of train is held out")
  format: str | None = setting(None, doc="files: csv | tsv | jsonl (default: from the suffix)")
  text_field: str = setting("sentence", doc="files: the column/key holding the text")
  label_field: str = setting("label", doc="files: the column/key holding the label")
  label_names: dict[str, str] | None = setting(
      None, doc="label value -> target string, e.g. {'0': negative, '1': positive}")
  prefix: str = setting("classify", doc="inputs are '<prefix>: <text>'")
  max_input_chars: int = setting(400, doc="inputs are cut to this many characters")
  max_train_examples: int | None = setting(None, doc="cap on training examples (first N "
                                                    "after a seeded shuffle)")
  max_validation_examples: int | None = setting(None, doc="cap on validation examples")
  validation_fraction: float = setting(0.2, doc="held-out fraction when no validation file")
  augment: dict[str, Any] | None = setting(
      None, doc="training-time augmentation, e.g. {token_dropout: 0.1}: registers "
                "'<task>.augmented' for training")
  seed: int = setting(0, doc="split/shuffle seed")
  inputs_length: int | None = setting(None, doc="TASK_FEATURE_LENGTHS inputs (default: the "
                                                "longest tokenized input, at most 256)")
  targets_length: int | None = setting(None, doc="TASK_FEATURE_LENGTHS targets (default: the "
                                                 "longest tokenized target)")

  def validate(self):
    if self.source not in ("python_stdlib_packages", "files"):
      raise ValueError(f"source: {self.source!r} is not python_stdlib_packages or files")
    if self.source == "files" and not self.train_path:
      raise ValueError("train_path: required when source is 'files'")
    if self.format not in (None, "csv", "tsv", "jsonl"):
      raise ValueError(f"format: {self.format!r} is not csv, tsv or jsonl")


def _first_paragraph(doc: str) -> str:
  para = doc.strip().split("\n\n")[0]
  return re.sub(r"\s+", " ", para).strip()


def stdlib_package_examples(packages, *, seed: int, validation_fraction: float):
  """(train, validation) lists of {"inputs", "targets", "id"} from stdlib docstrings."""
  from pipelines.transforms.shards import stable_hash
  from pipelines.transforms.stdlib import stdlib_root
  root = stdlib_root()
  train, val = [], []
  for pkg in packages:
    pdir = root / pkg
    if not pdir.is_dir():
      import difflib
      known = sorted(p.name for p in root.iterdir()
                     if p.is_dir() and (p / "__init__.py").exists())
      close = difflib.get_close_matches(pkg, known, n=1)
      raise DataError(f"packages: {pkg!r} is not a package folder of the standard library "
                      f"({root})" + (f"; did you mean {close[0]!r}?" if close else "") +
                      " (a class needs a package with docstrings, e.g. 'json', 'email')")
    count = len(train) + len(val)
    for f in sorted(pdir.rglob("*.py")):
      rel = f.relative_to(root).as_posix()
      if "/test" in rel:
        continue
      try:
        tree = ast.parse(f.read_text(encoding="utf-8"))
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
      nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
          n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
      split = (val if stable_hash(seed, "split", rel) % 1000 < validation_fraction * 1000
               else train)
      for n in nodes:
        doc = ast.get_docstring(n)
        if not doc:
          continue
        text = _first_paragraph(doc)
        if len(text) < 20:
          continue
        name = getattr(n, "name", "<module>")
        split.append({"id": f"{rel}:{name}:{getattr(n, 'lineno', 0)}", "text": text,
                      "label": pkg})
    if len(train) + len(val) == count:
      raise DataError(f"packages: {pkg!r} has no docstring of 20 characters or more outside "
                      "its tests, so its class would have no example; choose another package")
  return train, val


def read_labelled_file(path: Path, *, fmt: str | None, text_field: str, label_field: str):
  """Rows {"id", "text", "label"} from a CSV/TSV/JSONL file; errors name file and line."""
  fmt = fmt or {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl"}.get(path.suffix)
  if fmt is None:
    raise DataError(f"{path}: cannot tell the format from the suffix; set settings.format")
  rows = []
  try:
    _read_rows(path, fmt, text_field, label_field, rows)
  except UnicodeDecodeError as e:
    line = path.read_bytes()[:e.start].count(b"\n") + 1
    raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}); convert the file to "
                    "UTF-8") from None
  except csv.Error as e:
    raise DataError(f"{path}: {fmt.upper()} error: {e}") from None
  return rows


def _read_rows(path: Path, fmt: str, text_field: str, label_field: str, rows: list) -> None:
  # utf-8-sig: a byte-order mark would otherwise become part of the first column's name.
  with open(path, encoding="utf-8-sig", newline="") as f:
    if fmt == "jsonl":
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          r = json.loads(line)
          rows.append({"id": f"{path.name}:{i}", "text": str(r[text_field]),
                       "label": str(r[label_field])})
        except (ValueError, KeyError, TypeError, IndexError) as e:
          raise DataError(f"{path}:{i}: bad JSONL record ({type(e).__name__}: {e}); "
                          f"expected keys '{text_field}' and '{label_field}'") from None
    else:
      reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",",
                              quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
      for field in (text_field, label_field):
        if field not in (reader.fieldnames or []):
          raise DataError(f"{path}:1: no column '{field}' (columns: {reader.fieldnames}); "
                          "set settings.text_field / settings.label_field")
      for i, r in enumerate(reader, 2):
        if r.get(text_field) is None or r.get(label_field) is None:
          raise DataError(f"{path}:{i}: row has too few fields")
        rows.append({"id": f"{path.name}:{i}", "text": r[text_field], "label": r[label_field]})


def _feature_lengths(splits, vocab_path, inputs_length, targets_length) -> dict[str, int]:
  """Token lengths (with EOS) covering the data, rounded up to a multiple of 8."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=vocab_path)
  rows = [r for rows in splits.values() for r in rows]
  up8 = lambda n: -(-n // 8) * 8
  if inputs_length is None:
    inputs_length = min(256, up8(1 + max(len(x) for x in sp.encode([r["inputs"] for r in rows]))))
  if targets_length is None:
    targets_length = up8(1 + max(len(x) for x in sp.encode([r["targets"] for r in rows])))
  return {"inputs": inputs_length, "targets": targets_length}


@register
class Dataset(StageKind):
  kind = "dataset"
  version = "1"
  produces = "task"
  settings_cls = DatasetSettings
  slots = {"vocab": Slot(("vocabulary",))}
  doc = "labelled downstream data (stdlib packages, or CSV/TSV/JSONL) -> seqio text-to-text task"

  def identity(self, settings, *, base_dir):
    ident = dataclasses.asdict(settings)
    if settings.source == "python_stdlib_packages":
      from pipelines.transforms.stdlib import python_version
      ident["python_version"] = python_version()
    for key in ("train_path", "validation_path"):
      if getattr(settings, key):
        ident[key] = path_identity(base_dir, getattr(settings, key))
    return ident

  def run(self, ctx):
    import random
    from palmflow.dag.executor import resolve_path
    from pipelines.transforms.shards import stable_hash
    s = ctx.settings
    if s.source == "python_stdlib_packages":
      train, val = stdlib_package_examples(s.packages, seed=s.seed,
                                           validation_fraction=s.validation_fraction)
    else:
      kw = dict(fmt=s.format, text_field=s.text_field, label_field=s.label_field)
      train = read_labelled_file(resolve_path(ctx.base_dir, s.train_path), **kw)
      if s.validation_path:
        val = read_labelled_file(resolve_path(ctx.base_dir, s.validation_path), **kw)
      else:
        held = [r for r in train
                if stable_hash(s.seed, "split", r["id"]) % 1000 < s.validation_fraction * 1000]
        ids = {r["id"] for r in held}
        train, val = [r for r in train if r["id"] not in ids], held
    names = dict(s.label_names or {})

    def convert(rows, cap):
      rows = sorted(rows, key=lambda r: r["id"])
      random.Random(s.seed).shuffle(rows)
      out = []
      for r in rows[:cap] if cap else rows:
        if names and r["label"] not in names:
          raise DataError(f"{r['id']}: label {r['label']!r} is not in settings.label_names "
                          f"({sorted(names)})")
        out.append({"id": r["id"], "inputs": f"{s.prefix}: {r['text'][:s.max_input_chars]}",
                    "targets": names.get(r["label"], r["label"])})
      return out
    splits = {"train": convert(train, s.max_train_examples),
              "validation": convert(val, s.max_validation_examples)}
    for split, rows in splits.items():
      if not rows:
        raise DataError(f"split '{split}' is empty; check the source settings")
      with atomic_path(ctx.out_dir / f"{split}.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                       encoding="utf-8")
    labels = sorted(set(names.values()) if names else
                    {r["targets"] for r in splits["train"]})
    vocab = ctx.inputs["vocab"]
    vocab_path = str(vocab.path / vocab.manifest["summary"]["model"])
    lengths = _feature_lengths(splits, vocab_path, s.inputs_length, s.targets_length)
    from palmflow.stages.blocks import task_name
    spec = {"type": "text_to_text", "name": task_name(ctx.pipeline, ctx.name, ctx.fingerprint),
            "files": {k: str(ctx.out_dir / f"{k}.jsonl") for k in splits},
            "vocab_path": vocab_path, "vocab_sha256": vocab.manifest["summary"]["sha256"],
            "feature_lengths": lengths, "label_names": labels, "augment": s.augment,
            "feature_converter": "prefix_lm", "splits": list(splits)}
    write_json(ctx.out_dir / "task.json", spec)
    counts = {k: len(v) for k, v in splits.items()}
    by_label = {}
    for r in splits["train"]:
      by_label[r["targets"]] = by_label.get(r["targets"], 0) + 1
    ctx.log(f"{counts} examples, {len(labels)} labels")
    return {"task": spec, "stats": {"examples": counts, "train_label_counts": by_label}}
