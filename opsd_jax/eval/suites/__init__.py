"""Evaluation suites: the three shipped with the package (AIME 2024, AIME 2025, HMMT February 2025;
provenance in BUILD_NOTES.md) or any JSON Lines / Parquet / saved HF dataset with problem and
answer columns."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

BUILTIN = ("aime24", "aime25", "hmmt25")
PROBLEM_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("answer",)


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    source: str  # the file or folder it was read from
    problems: tuple[Problem, ...]

    @property
    def fingerprint(self) -> str:
        """sha256 over ids, statements and answers: a resumed run must see the same problems."""
        digest = hashlib.sha256()
        for p in self.problems:
            digest.update(json.dumps([p.id, p.problem, p.answer]).encode())
        return digest.hexdigest()

    def by_id(self) -> dict[str, Problem]:
        return {p.id: p for p in self.problems}


def builtin_path(name: str) -> str:
    return os.path.join(os.path.dirname(__file__), f"{name}.jsonl")


def _field(row: dict, names: tuple[str, ...], where: str) -> str:
    for name in names:
        if name in row:
            value = row[name]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
                raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
            return str(value)
    wanted = " or ".join(repr(n) for n in names)
    raise ValueError(f"{where}: missing field {wanted} (fields present: {sorted(row)})")


def _rows_jsonl(path: str):
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{line_number}", row


def _rows_parquet(path: str):
    try:
        import pyarrow.parquet
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    for index, row in enumerate(pyarrow.parquet.read_table(path).to_pylist()):
        yield f"{path} row {index}", row


def _rows_saved_dataset(path: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: reading a saved HF dataset needs `datasets` (pip install datasets)") from None
    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        split = "test" if "test" in dataset else (next(iter(dataset)) if len(dataset) == 1 else None)
        if split is None:
            raise ValueError(f"{path}: a dataset with splits {list(dataset)} and no 'test' split; save one split")
        dataset = dataset[split]
    for index, row in enumerate(dataset):
        yield f"{path} row {index}", row


def load_suite(spec: str) -> Suite:
    """A built-in suite by name (aime24, aime25, hmmt25), or a file / saved-dataset folder.

    Rows need a problem ('problem' or 'question') and an 'answer'; 'id' defaults to
    NAME-INDEX. Errors name the file and line (or row) and the field.
    """
    if spec in BUILTIN:
        path, name = builtin_path(spec), spec
    else:
        path = spec
        name = os.path.splitext(os.path.basename(os.path.normpath(spec)))[0]
        if not os.path.exists(path):
            raise FileNotFoundError(f"suite {spec!r}: neither a built-in suite ({', '.join(BUILTIN)}) nor a file")
    if os.path.isdir(path):
        rows = _rows_saved_dataset(path)
    elif path.endswith(".parquet"):
        rows = _rows_parquet(path)
    else:
        rows = _rows_jsonl(path)
    problems, seen = [], {}
    for index, (where, row) in enumerate(rows):
        problem_id = str(row["id"]) if row.get("id") not in (None, "") else f"{name}-{index}"
        if problem_id in seen:
            raise ValueError(f"{where}: duplicate id {problem_id!r} (first at {seen[problem_id]})")
        seen[problem_id] = where
        problems.append(Problem(problem_id, _field(row, PROBLEM_FIELDS, where), _field(row, ANSWER_FIELDS, where)))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return Suite(name, path, tuple(problems))


def parse_suites(text: str) -> list[Suite]:
    """Comma-separated suite names or paths, e.g. "aime24,aime25,hmmt25"."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ValueError("--suite needs at least one suite name or path")
    suites = [load_suite(s) for s in specs]
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise ValueError(f"two suites share a name in {names}; rename one file")
    return suites
