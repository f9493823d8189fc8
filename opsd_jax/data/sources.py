"""Training problems from JSON Lines, Parquet or HF `datasets` saved to disk, as grain datasets.

Column names are configurable; presets name the columns of the datasets the paper uses:
OpenThoughts-math (problem / solution / Answer), Countdown-CoT (datapoint_input_text /
response_suffix / response_answer_only) and MATH as shipped in shared/data (problem / solution /
answer).
"""

from __future__ import annotations

import dataclasses

import grain

from opsd_jax.data.records import DataError, read_rows

PRESETS = {
    "math": ("problem", "solution", "answer"),
    "openthoughts": ("problem", "solution", "Answer"),
    "countdown": ("datapoint_input_text", "response_suffix", "response_answer_only"),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    solution: str
    answer: str


def read_problems(path: str, *, data_format: str = "auto", preset: str = "none",
                  columns: tuple[str, str, str] = ("problem", "solution", "answer"),
                  split: str | None = None) -> list[Problem]:
    """All problems of a file. Raises DataError naming the file, row and missing column, or an
    empty dataset."""
    problem_column, solution_column, answer_column = PRESETS.get(preset, columns)
    problems = []
    for number, (where, row) in enumerate(read_rows(path, data_format, split), 1):
        for column in (problem_column, solution_column, answer_column):
            if column not in row or row[column] is None:
                raise DataError(f"{where}: no column {column!r} (columns: {', '.join(sorted(row))})")
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
