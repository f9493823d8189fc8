"""Problem datasets: readers for JSON Lines, Parquet and saved HF datasets, and grain pipelines."""

from opsd_jax.data.records import DataError, read_rows
from opsd_jax.data.sources import PRESETS, Problem, problem_dataset, read_problems

__all__ = ["PRESETS", "DataError", "Problem", "problem_dataset", "read_problems", "read_rows"]
