"""The paper's training sets, rebuilt from local copies of their Hugging Face sources.

Behaviour follows the paper's data tools (princeton-pli/rethinking-opsd-for-thinking-models,
`data_tools/build_openthoughts_30k.py`, `make_openthoughts_15k_subset.py`, `build_countdown.py`):

openthoughts: Ashkchamp/Openthoughts_math_filtered_30K (train split) -> system turns dropped from
  `conversations`; assistant
  thought / solution tags mapped to <think> ... </think>; a user turn that starts with the boxed
  instruction gets it moved to its end; `problem` ends with " Return your final response within
  \\boxed{}." (added after a space unless already there). Written whole (29,439 rows per the
  paper) and as its first 15,000 rows. The paper's builder asks `datasets.map` to remove the
  columns messages, system, generated_token_count and Question, but its map function returns the
  whole row, and `datasets` keeps any column the function returns; we do the same, so the columns
  match the paper's files whatever the source holds (training reads only problem / solution /
  Answer).
countdown: jasonrqh/Countdown-CoT-20k (train split) -> each row plus source_index,
  datapoint_input_text (the prompt), datapoint_nums / datapoint_x, datapoint_y / datapoint_target,
  output_text, response_suffix (the response after the first </think> or <|end_of_thought|>),
  response_answer_only (\\boxed{last complete box of the suffix}, else the suffix), input_count;
  shuffled with `datasets` seed 42; the first 15,000 rows train, the next 500 the held-out suite.

There is no hub access here: the sources are read from a local parquet / JSON Lines file or a
`save_to_disk` folder in the hub's schema. Every output is written beside its final name and
renamed when complete. `content_checksum` lets a user compare a build with another one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from opsd_jax.eval.countdown import last_complete_box

BOXED_INSTRUCTION = "Return your final response within \\boxed{}."
OPENTHOUGHTS_DROPPED = ("messages", "system", "generated_token_count", "Question")
OPENTHOUGHTS_SUBSET = 15000
COUNTDOWN_SEED, COUNTDOWN_TRAIN, COUNTDOWN_EVAL = 42, 15000, 500
# Rows the paper's README reports for its builds (the first wave of a user's check).
EXPECTED_ROWS = {"openthoughts_math_filtered_30k": 29439, "openthoughts_math_filtered_15k": 15000,
                 "countdown_15k": 15000, "countdown_500": 500}

_THINK_END = re.compile(r"</think>\s*|<\|end_of_thought\|>\s*")
_NUMBERS = re.compile(r"Numbers:\s*\[([^\]]*)\]")
_TARGET = re.compile(r"Target:\s*(-?\d+(?:\.\d+)?)")


class BuildError(ValueError):
    """A source that is not in the expected schema; the message names the file, row and column."""


def load_source(path: str):
    """A `datasets.Dataset` from a parquet / JSON Lines file or a saved dataset folder (its train
    split when it is a DatasetDict)."""
    import datasets

    if os.path.isdir(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise BuildError(f"{path}: a dataset with splits {sorted(loaded)} and no 'train'")
            loaded = loaded["train"]
        return loaded
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such source file or folder")
    kind = "parquet" if path.endswith(".parquet") else "json" if path.endswith((".jsonl", ".json")) else None
    if kind is None:
        raise BuildError(f"{path}: expected a .parquet or .jsonl file, or a saved dataset folder")
    try:
        return datasets.load_dataset(kind, data_files=path, split="train")
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        # datasets names the file only in its log; a truncated parquet says "magic bytes not found"
        raise BuildError(f"{path}: not a readable {kind} file ({str(e).splitlines()[0][:200]})") from None


def _require(dataset, columns: tuple[str, ...], path: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise BuildError(f"{path}: no column {missing[0]!r} (columns: {', '.join(dataset.column_names)})")


def _naming_rows(clean, source: str):
    """`clean(row, index)` for `datasets.map(..., with_indices=True)`, whose failures on a
    malformed row (a null turn, a string where a mapping belongs) name the file and row."""
    def cleaned(row: dict, index: int) -> dict:
        try:
            return clean(row, index)
        except (AttributeError, TypeError, ValueError, KeyError) as e:
            raise BuildError(f"{source}: row {index}: malformed ({type(e).__name__}: {e})") from None
    return cleaned


# ---- OpenThoughts ---------------------------------------------------------------------------------

def clean_openthoughts_row(row: dict) -> dict:
    """One source row as the paper's builder leaves it (see the module docstring)."""
    turns = []
    for turn in row.get("conversations") or []:
        role, value = turn.get("from"), turn.get("value")
        if role == "system":
            continue
        if role == "assistant":
            for tag, replacement in (("<|begin_of_thought|>", "<think>"), ("<|end_of_thought|>", "</think>"),
                                     ("<|begin_of_solution|>", "\n\n"), ("<|end_of_solution|>", "")):
                value = value.replace(tag, replacement)
            turns.append({"from": role, "value": value})
        elif role == "user":
            prefix = BOXED_INSTRUCTION + " "
            if value.startswith(prefix):
                value = value[len(prefix):] + " " + BOXED_INSTRUCTION
            turns.append({"from": role, "value": value})
        else:
            turns.append(turn)
    problem = row.get("problem") or ""
    if not problem.rstrip().endswith(BOXED_INSTRUCTION):
        problem = problem.rstrip() + " " + BOXED_INSTRUCTION
    return {**row, "conversations": turns, "problem": problem}


def build_openthoughts(source: str, out_dir: str) -> dict[str, str]:
    """Writes openthoughts_math_filtered_30k.parquet and its first-15k subset; returns name -> path."""
    dataset = load_source(source)
    _require(dataset, ("problem", "solution", "Answer", "conversations"), source)
    dropped = [c for c in OPENTHOUGHTS_DROPPED if c in dataset.column_names]
    cleaned = dataset.map(_naming_rows(lambda row, _: clean_openthoughts_row(row), source), with_indices=True,
                          remove_columns=dropped)
    subset = cleaned.select(range(min(OPENTHOUGHTS_SUBSET, len(cleaned))))
    return {name: _write_parquet(data, out_dir, name) for name, data in
            (("openthoughts_math_filtered_30k", cleaned), ("openthoughts_math_filtered_15k", subset))}


# ---- Countdown ------------------------------------------------------------------------------------

def _number(text: str):
    value = float(text)
    return int(value) if value.is_integer() else value


def normalize_countdown_row(row: dict, index: int) -> dict:
    """One source row plus the paper's derived columns (see the module docstring)."""
    answer = row.get("answer") or {}
    prompt = row.get("prompt") or ""
    numbers, target = answer.get("numbers"), answer.get("target")
    if numbers is None:
        match = _NUMBERS.search(prompt)
        numbers = [_number(p.strip()) for p in match.group(1).split(",") if p.strip()] if match else []
    if target is None:
        match = _TARGET.search(prompt)
        target = _number(match.group(1)) if match else None
    response = row.get("response") or ""
    end = _THINK_END.search(response)
    suffix = response[end.end():] if end else ""
    boxed = last_complete_box(suffix)  # None or "" (an empty box): keep the whole suffix
    return {"source_index": index, "datapoint_input_text": prompt, "datapoint_nums": numbers,
            "datapoint_x": numbers, "datapoint_y": target, "datapoint_target": target, "output_text": response,
            "response_suffix": suffix, "response_answer_only": f"\\boxed{{{boxed}}}" if boxed else suffix,
            "input_count": len(numbers)}


def build_countdown(source: str, out_dir: str, *, seed: int = COUNTDOWN_SEED, train_size: int = COUNTDOWN_TRAIN,
                    eval_size: int = COUNTDOWN_EVAL) -> dict[str, str]:
    """Writes countdown_<all>.parquet, countdown_<train>.parquet and countdown_<eval>.parquet
    (disjoint prompts); returns name -> path."""
    dataset = load_source(source)
    _require(dataset, ("prompt", "response"), source)
    normalized = dataset.map(_naming_rows(normalize_countdown_row, source), with_indices=True)
    unique = len(set(normalized["prompt"]))
    if unique < train_size + eval_size:
        raise BuildError(f"{source}: {unique} distinct prompts, fewer than the {train_size} + {eval_size} the "
                         "train and held-out splits need")
    shuffled = normalized.shuffle(seed=seed)
    train = shuffled.select(range(train_size))
    held_out = shuffled.select(range(train_size, train_size + eval_size))
    overlap = set(train["prompt"]) & set(held_out["prompt"])
    if overlap:
        raise BuildError(f"{source}: {len(overlap)} prompts are in both the train and the held-out split "
                         f"(the source repeats prompts), e.g. {next(iter(overlap))[:80]!r}")
    return {name: _write_parquet(data, out_dir, name) for name, data in
            ((f"countdown_{_size_label(len(normalized))}", normalized), (f"countdown_{_size_label(train_size)}", train),
             (f"countdown_{_size_label(eval_size)}", held_out))}


def _size_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


# ---- output ---------------------------------------------------------------------------------------

def _write_parquet(dataset, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.parquet")
    staging = os.path.join(out_dir, f".{name}.parquet.partial")
    dataset.to_parquet(staging)
    os.replace(staging, path)
    return path


def content_checksum(path: str, columns: tuple[str, ...]) -> str:
    """sha256 over the rows' `columns`, in file order, one canonical JSON line per row.

    Parquet bytes differ between pyarrow versions; this does not, so two builds of the same
    source agree exactly when their rows do.
    """
    import pyarrow.parquet

    table = pyarrow.parquet.read_table(path, columns=list(columns))
    digest = hashlib.sha256()
    for row in table.to_pylist():
        digest.update((json.dumps([row[c] for c in columns], sort_keys=True, ensure_ascii=False) + "\n").encode())
    return digest.hexdigest()


CHECKSUM_COLUMNS = {"openthoughts": ("problem", "solution", "Answer"),
                    "countdown": ("source_index", "datapoint_input_text", "response_suffix")}
