"""Evaluation suites: those shipped with the package (AIME 2024, AIME 2025, HMMT February 2025, and
aime24_h4: AIME 2024 in the AoPS-wiki wording of HuggingFaceH4/aime_2024, the one the paper
evaluated; provenance in BUILD_NOTES.md) or any JSON Lines / Parquet / saved HF dataset with problem
and answer columns."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from opsd_jax.data.records import read_rows
from opsd_jax.paths import user_path

BUILTIN = ("aime24", "aime25", "hmmt25", "aime24_h4")
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
    # math: answers are LaTeX, graded by the strict or the paper grader; countdown: answers are
    # opsd_jax.eval.countdown references (numbers and target), graded by the paper's Countdown rule.
    kind: str = "math"

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


def suite_rows(path: str):
    """(where, row) of a suite file or saved-dataset folder. Any name that is not .parquet or a
    folder reads as JSON Lines, as suites always have."""
    declared = "auto" if os.path.isdir(path) or path.endswith(".parquet") else "jsonl"
    return read_rows(path, declared)


def row_problem_id(row: dict, suite_name: str, index: int) -> str:
    """A suite row's id: its 'id' field, else NAME-INDEX (0-based), as generations files key it."""
    return str(row["id"]) if row.get("id") not in (None, "") else f"{suite_name}-{index}"


def load_suite(spec: str) -> Suite:
    """A built-in suite by name (aime24, aime25, hmmt25), or a file / saved-dataset folder.

    Rows need a problem ('problem' or 'question') and an 'answer'; 'id' defaults to
    NAME-INDEX. Errors name the file and line (or row) and the field. A file in the Countdown
    schema of `opsd-jax data countdown` (datapoint_input_text, datapoint_x, datapoint_y: e.g. its
    countdown_500.parquet held-out split) is a Countdown suite: the prompt is datapoint_input_text
    verbatim, the answer the numbers and target.
    """
    if spec in BUILTIN:
        path, name = builtin_path(spec), spec
    else:
        path = user_path(spec)
        name = os.path.splitext(os.path.basename(os.path.normpath(spec)))[0]
        if not os.path.exists(path):
            raise FileNotFoundError(f"suite {spec!r}: neither a built-in suite ({', '.join(BUILTIN)}) nor a file")
    problems, seen, kinds = [], {}, set()
    for index, (where, row) in enumerate(suite_rows(path)):
        problem_id = row_problem_id(row, name, index)
        if problem_id in seen:
            raise ValueError(f"{where}: duplicate id {problem_id!r} (first at {seen[problem_id]})")
        seen[problem_id] = where
        if COUNTDOWN_PROBLEM_FIELD in row:
            kinds.add("countdown")
            problems.append(Problem(problem_id, _field(row, (COUNTDOWN_PROBLEM_FIELD,), where),
                                    _countdown_reference(row, where)))
        else:
            kinds.add("math")
            problems.append(Problem(problem_id, _field(row, PROBLEM_FIELDS, where),
                                    _field(row, ANSWER_FIELDS, where)))
    if not problems:
        raise ValueError(f"{path}: no problems")
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes Countdown rows ({COUNTDOWN_PROBLEM_FIELD}) with math rows")
    return Suite(name, path, tuple(problems), kinds.pop())


COUNTDOWN_PROBLEM_FIELD = "datapoint_input_text"


def _countdown_reference(row: dict, where: str) -> str:
    from opsd_jax.eval.countdown import reference

    numbers = row.get("datapoint_x", row.get("datapoint_nums"))
    target = row.get("datapoint_y", row.get("datapoint_target"))
    if not isinstance(numbers, list) or not numbers or not all(isinstance(n, (int, float)) for n in numbers):
        raise ValueError(f"{where}: field 'datapoint_x' must be a non-empty list of numbers, got {numbers!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise ValueError(f"{where}: field 'datapoint_y' must be a number, got {target!r}")
    return reference(numbers, target)


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
