"""Training problems from JSON Lines, Parquet or HF `datasets` saved to disk, as grain datasets.

Column names are configurable; presets name the columns of the datasets the paper uses:
OpenThoughts-math (problem / solution / Answer), Countdown-CoT (datapoint_input_text /
response_suffix / response_answer_only) and MATH as shipped in shared/data (problem / solution /
answer).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

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
                  split: str | None = None, used: tuple[str, ...] = ("problem", "solution", "answer"),
                  keep_empty: bool = False) -> list[Problem]:
    """All problems of a file. used: the fields the run reads (of problem, solution, answer); their
    cells may not be null or empty, except that keep_empty keeps an empty solution or answer. The
    other columns must exist and may hold anything (a null reads as ""). Raises DataError naming
    the file, row and column, or an empty dataset."""
    named = dict(zip(("problem", "solution", "answer"), PRESETS.get(preset, columns)))
    problems = []
    for number, (where, row) in enumerate(read_rows(path, data_format, split), 1):
        values = {}
        for field, column in named.items():
            if column not in row:
                raise DataError(f"{where}: no column {column!r} (columns: {', '.join(sorted(row))})")
            value = row[column]
            if field in used and (value is None or not str(value).strip()):
                # Empty text would reach a prompt silently: a blank problem, or a teacher whose
                # privileged context says nothing.
                always_refused = value is None or field == "problem"
                if always_refused or not keep_empty:
                    hint = "" if always_refused else (
                        " (data.empty_context: keep trains on it as it is, as the paper's trainer does)")
                    raise DataError(f"{where}: column {column!r} is {'null' if value is None else 'empty'}{hint}")
            values[field] = "" if value is None else str(value)
        problems.append(Problem(id=str(row.get("id", number)), **values))
    if not problems:
        raise DataError(f"{path}: the dataset is empty")
    return problems


def problem_dataset(problems: list, *, seed: int, process_index: int = 0, process_count: int = 1,
                    order: str = "shuffle", batch_size: int | None = None, steps: int | None = None):
    """An endless grain dataset of this host's problems; its iterator's state (`get_state` /
    `set_state`) resumes exactly where it stopped.

    order="shuffle": hosts take disjoint strided shards, so each reads only its own part, each
    reshuffled every epoch by grain.
    order="paper": the global order of the paper's trainer (`paper_order`) for `steps` batches of
    `batch_size`; each batch is cut into equal consecutive parts, host i taking part i. Past
    `steps` batches the same stream starts again.
    """
    if order == "shuffle":
        shard = grain.MapDataset.source(problems)[process_index::process_count]
        return shard.seed(seed).shuffle().repeat().to_iter_dataset()
    if order != "paper":
        raise ValueError(f"data.order must be 'shuffle' or 'paper', got {order!r}")
    if batch_size is None or steps is None or batch_size % process_count:
        raise ValueError("data.order 'paper' needs the global batch size (a multiple of the process count) "
                         "and the number of steps")
    if batch_size > len(problems):
        raise DataError(f"data.order 'paper' draws whole batches of {batch_size} and the dataset has only "
                        f"{len(problems)} problems")
    per_epoch = len(problems) // batch_size * batch_size
    epochs = max(-(-steps * batch_size // per_epoch), 1)
    local = batch_size // process_count
    batches = paper_order(len(problems), seed=seed, batch_size=batch_size, epochs=epochs).reshape(-1, batch_size)
    mine = batches[:, process_index * local:(process_index + 1) * local].reshape(-1)
    return grain.MapDataset.source([problems[i] for i in mine]).repeat().to_iter_dataset()


def _torch_randperm(n: int, random_state: np.random.RandomState):
    """int64[n]: `torch.randperm(n, generator=g)` on CPU, where `random_state` stands for g.

    torch's CPU randperm (for n below 2^32 / 20) is a Fisher-Yates pass drawing one 32-bit
    MT19937 output per position, and `torch.Generator().manual_seed(s)` seeds MT19937 as
    `np.random.RandomState(s)` does; a full-range uint32 draw of RandomState is that raw output.
    Checked against torch in tests/data/test_sources.py.
    """
    if n >= 2**32 // 20:
        raise ValueError(f"torch draws {n}-element permutations another way; not reproduced here")
    draws = random_state.randint(0, 2**32, size=max(n - 1, 0), dtype=np.uint64)
    order = np.arange(n)
    for i, draw in enumerate(draws.tolist()):
        j = i + draw % (n - i)
        order[i], order[j] = order[j], order[i]
    return order


def paper_order(n: int, *, seed: int, batch_size: int, epochs: int = 1):
    """int64[epochs * (n // batch_size) * batch_size]: the rows of a file of n rows in the order
    the paper's trainer trains on them, consecutive `batch_size` rows per optimizer step.

    The paper (princeton-pli/rethinking-opsd-for-thinking-models, train.py and opsd/trainer.py)
    shuffles the dataset with `datasets`' `shuffle(seed)` (numpy's `default_rng(seed)`
    permutation), then TRL's RepeatSampler draws `torch.randperm` of a generator seeded once
    with the same seed, each epoch, in chunks of the global batch, dropping the partial last
    chunk; every optimizer step trains on one chunk (its order within the step differs only by
    which device runs which row).
    """
    rows = np.random.default_rng(seed).permutation(n)
    sampler = np.random.RandomState(seed)
    keep = n // batch_size * batch_size
    return np.concatenate([rows[_torch_randperm(n, sampler)[:keep]] for _ in range(epochs)])
