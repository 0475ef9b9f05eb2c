"""The dataset stage's readers: stdlib packages and labelled files, with errors that name
the package, or the file and line."""
from __future__ import annotations

import pytest

from palmflow.errors import DataError
from palmflow.stages.dataset import read_labelled_file, stdlib_package_examples


def test_stdlib_packages_a_typo_is_named_with_the_closest_package():
  train, val = stdlib_package_examples(["json"], seed=0, validation_fraction=0.2)
  assert train and {r["label"] for r in train + val} == {"json"}
  with pytest.raises(DataError, match="'asycnio' is not a package folder.*did you mean "
                                      "'asyncio'"):
    stdlib_package_examples(["json", "asycnio"], seed=0, validation_fraction=0.2)
  with pytest.raises(DataError, match="'csv.py' is not a package folder"):
    stdlib_package_examples(["csv.py"], seed=0, validation_fraction=0.2)


def test_labelled_files_bom_bad_bytes_and_bad_records_name_file_and_line(tmp_path):
  tsv = tmp_path / "a.tsv"
  tsv.write_bytes(b"\xef\xbb\xbfsentence\tlabel\ngood movie\t1\n")    # a byte-order mark
  assert read_labelled_file(tsv, fmt=None, text_field="sentence", label_field="label") == [
      {"id": "a.tsv:2", "text": "good movie", "label": "1"}]
  tsv.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff byte\t0\n")
  with pytest.raises(DataError, match=rf"{tsv}:3: not UTF-8 text"):
    read_labelled_file(tsv, fmt=None, text_field="sentence", label_field="label")
  jsonl = tmp_path / "b.jsonl"
  jsonl.write_text('{"text": "x", "label": "y"}\n["a", "list"]\n')
  with pytest.raises(DataError, match=rf"{jsonl}:2: bad JSONL record"):
    read_labelled_file(jsonl, fmt=None, text_field="text", label_field="label")
