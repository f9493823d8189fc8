"""Training problems from JSON Lines, Parquet or HF `datasets` saved to disk, as grain datasets.

Column names are configurable; presets name the columns of the datasets the paper uses:
OpenThoughts-math (problem / solution / Answer), Countdown-CoT (datapoint_input_text /
response_suffix / response_answer_only) and MATH as shipped in shared/data (problem / solution /
answer).
"""

from __future__ import annotations

import dataclasses
import json
import os

import grain

PRESETS = {
    "math": ("problem", "solution", "answer"),
    "openthoughts": ("problem", "solution", "Answer"),
    "countdown": ("datapoint_input_text", "response_suffix", "response_answer_only"),
}


class DataError(ValueError):
    """Unreadable or incomplete data; the message names the file, line or column."""


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    solution: str
    answer: str


def _format_of(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    if os.path.isdir(path):
        return "hf_disk"
    if path.endswith((".jsonl", ".json")):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    raise DataError(f"{path}: cannot tell the format from the name; set data.format")


def _rows(path: str, data_format: str, split: str | None):
    if not os.path.exists(path):
        raise DataError(f"{path}: dataset not found")
    if data_format == "jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object")
                yield number, row
        return
    if data_format == "parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield number, row
        return
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise DataError(f"{path}: a DatasetDict; set data.split to one of {sorted(loaded)}")
        loaded = loaded[split]
    for number, row in enumerate(loaded, 1):
        yield number, row


def read_problems(path: str, *, data_format: str = "auto", preset: str = "none",
                  columns: tuple[str, str, str] = ("problem", "solution", "answer"),
                  split: str | None = None) -> list[Problem]:
    """All problems of a file. Raises DataError naming the file, row and missing column, or an
    empty dataset."""
    problem_column, solution_column, answer_column = PRESETS.get(preset, columns)
    data_format = _format_of(path, data_format)
    problems = []
    for number, row in _rows(path, data_format, split):
        for column in (problem_column, solution_column, answer_column):
            if column not in row or row[column] is None:
                raise DataError(
                    f"{path}: row {number} has no column {column!r} (columns: {', '.join(sorted(row))})"
                )
        problems.append(Problem(
            id=str(row.get("id", number)), problem=str(row[problem_column]),
            solution=str(row[solution_column]), answer=str(row[answer_column]),
        ))
    if not problems:
        raise DataError(f"{path}: the dataset is empty")
    return problems


def problem_dataset(problems: list, *, seed: int, process_index: int = 0, process_count: int = 1):
    """An endless grain dataset of this host's problems, reshuffled every epoch.

    Hosts take disjoint strided shards, so each reads only its own part; the iterator's state
    (`get_state` / `set_state`) resumes exactly where it stopped.
    """
    shard = grain.MapDataset.source(problems)[process_index::process_count]
    return shard.seed(seed).shuffle().repeat().to_iter_dataset()
