"""Rows of JSON Lines, Parquet and saved HF datasets, each with where it came from.

Training problems and evaluation suites both read through here, so a bad row is reported the same
way everywhere: `path:line` for JSON Lines, `path row i` otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator


class DataError(ValueError):
    """Unreadable or incomplete data; the message names the file, line or column."""


def data_format(path: str, declared: str = "auto") -> str:
    """jsonl, parquet or hf_disk, from `declared` or the path."""
    if declared != "auto":
        return declared
    if os.path.isdir(path):
        return "hf_disk"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith((".jsonl", ".json")):
        return "jsonl"
    raise DataError(f"{path}: cannot tell the format from the name (.jsonl, .parquet or a saved dataset folder)")


def read_rows(path: str, declared_format: str = "auto", split: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yields (where, row) for every row. A saved DatasetDict needs `split`, unless it has a
    single split or a 'test' split, which is then taken."""
    if not os.path.exists(path):
        raise DataError(f"{path}: not found")
    kind = data_format(path, declared_format)
    if kind == "jsonl":
        yield from _jsonl_rows(path)
    elif kind == "parquet":
        import pyarrow.parquet

        for index, row in enumerate(pyarrow.parquet.read_table(path).to_pylist()):
            yield f"{path} row {index}", row
    else:
        import datasets

        dataset = datasets.load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            if split is None:
                split = "test" if "test" in dataset else (next(iter(dataset)) if len(dataset) == 1 else None)
            if split not in dataset:
                raise DataError(f"{path}: a dataset with splits {sorted(dataset)}; choose one of them")
            dataset = dataset[split]
        for index, row in enumerate(dataset):
            yield f"{path} row {index}", row


def _jsonl_rows(path: str) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{line_number}", row
