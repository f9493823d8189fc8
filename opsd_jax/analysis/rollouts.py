"""Rollout files the analysis reads: its own rollouts format, and the eval runner's generations.

Rollouts format (JSON Lines, written by `write_rollouts`):
  line 1, header: {"format": "opsd-jax-rollouts/1", "tokenizer_fingerprint": sha256 of the
    vocabulary (opsd_jax.eval.generations.tokenizer_fingerprint), optional "prompt": PromptSection
    fields the rollouts were sampled under (e.g. {"student_suffix": "", "student_thinking": true})}
  then one record per rollout: {"problem_id": str, "problem": str, "solution": str, "answer": str,
    "token_ids": [int, ...] the sampled completion, optional "sample_index": int}
Eval generations files (opsd_jax/eval/generations.py) carry each sample's text and the sampled
ids it decodes from (`token_ids`, stop token excluded); the ids are scored, as sampled. Files
written before the runner kept the ids carry text only: that text is encoded again with the same
tokenizer (checked by fingerprint), which can differ from what was sampled wherever the sampler
drew a non-canonical split. Problems, solutions and answers come from the suite file named in
the header.
"""

from __future__ import annotations

import dataclasses
import json
import os

from opsd_jax.config import PromptSection
from opsd_jax.data.records import read_rows
from opsd_jax.data.sources import Problem
from opsd_jax.distill.prompts import chat_prompt_ids, student_prompt_text
from opsd_jax.eval import generations
from opsd_jax.eval.runner import prompt_opens_thinking

FORMAT = "opsd-jax-rollouts/1"


@dataclasses.dataclass(frozen=True)
class Rollout:
    problem: Problem
    token_ids: tuple[int, ...]
    sample_index: int = 0
    where: str = ""  # file:line, for errors


@dataclasses.dataclass(frozen=True)
class RolloutSet:
    path: str
    rollouts: tuple[Rollout, ...]
    prompt: PromptSection  # how the student was prompted (the teacher's privilege is set later)
    prompt_opens_thinking: bool


def write_rollouts(path: str, rollouts: list[Rollout], tokenizer, prompt: dict | None = None) -> None:
    """Writes a rollouts file atomically (header, then one line per rollout)."""
    header = {"format": FORMAT, "tokenizer_fingerprint": generations.tokenizer_fingerprint(tokenizer)}
    if prompt:
        header["prompt"] = prompt
    lines = [json.dumps(header, ensure_ascii=False)]
    for r in rollouts:
        lines.append(json.dumps({"problem_id": r.problem.id, "problem": r.problem.problem,
                                 "solution": r.problem.solution, "answer": r.problem.answer,
                                 "token_ids": [int(t) for t in r.token_ids], "sample_index": r.sample_index},
                                ensure_ascii=False))
    generations.write_atomic(path, "\n".join(lines) + "\n")


def _prompt_section(value, where: str) -> PromptSection:
    if value is None:
        return PromptSection()
    if not isinstance(value, dict):
        raise ValueError(f"{where}: field 'prompt' must be an object of prompt settings")
    known = {f.name for f in dataclasses.fields(PromptSection)} - {"privilege"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{where}: field 'prompt' has unknown keys {unknown} (valid: {sorted(known)})")
    return PromptSection(**value)


def _check_tokenizer(header: dict, tokenizer, where: str) -> None:
    expected = generations.tokenizer_fingerprint(tokenizer)
    if header.get("tokenizer_fingerprint") != expected:
        raise ValueError(
            f"{where}: field 'tokenizer_fingerprint' is {header.get('tokenizer_fingerprint')!r}, but the student's "
            f"tokenizer has {expected!r}: these rollouts were tokenized by another tokenizer"
        )


def _read_lines(path: str) -> list[tuple[str, dict]]:
    rows = list(read_rows(path, "jsonl"))
    if not rows:
        raise ValueError(f"{path}: empty file (no header, no rollouts)")
    return rows


def _text_field(row: dict, field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} missing or not a string")
    return value


def _own_rollouts(path, rows, tokenizer) -> RolloutSet:
    where0, header = rows[0]
    _check_tokenizer(header, tokenizer, where0)
    prompt = _prompt_section(header.get("prompt"), where0)
    vocab = len(tokenizer)
    rollouts = []
    for where, row in rows[1:]:
        ids = row.get("token_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"{where}: field 'token_ids' must be a non-empty list of integers")
        _check_ids(ids, vocab, where)
        problem = Problem(id=_text_field(row, "problem_id", where), problem=_text_field(row, "problem", where),
                          solution=_text_field(row, "solution", where), answer=_text_field(row, "answer", where))
        rollouts.append(Rollout(problem, tuple(ids), int(row.get("sample_index", 0)), where))
    if not rollouts:
        raise ValueError(f"{path}: a header but no rollouts")
    # Whether the chat template's generation prompt opens <think> (Qwen3-2507-Thinking, OLMo-3
    # Think) is the template's, not the problem's: the first rollout's prompt tells.
    student_ids = chat_prompt_ids(tokenizer, student_prompt_text(rollouts[0].problem, prompt), prompt.student_thinking)
    return RolloutSet(path, tuple(rollouts), prompt,
                      prompt_opens_thinking=prompt_opens_thinking(tokenizer, student_ids))


def _suite_rows(header: dict, where: str) -> dict[str, dict]:
    from opsd_jax.eval.suites import BUILTIN, builtin_path, row_problem_id, suite_rows

    source = builtin_path(header["suite"]) if header.get("suite") in BUILTIN else header.get("suite_source")
    if not source or not os.path.exists(source):
        raise ValueError(f"{where}: the suite file {source!r} named by the header is not there; problems, "
                         "solutions and answers are read from it")
    # Read as the eval runner read it (same formats, same ids), so every problem id in the
    # generations file finds its row.
    return {row_problem_id(row, header["suite"], index): row for index, (_, row) in enumerate(suite_rows(source))}


def _check_ids(ids: list, vocab: int, where: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{where}: field 'token_ids' holds {bad[0]}, outside the tokenizer's {vocab} tokens")


def _generation_ids(record: dict, tokenizer, where: str) -> list:
    """The ids to score for one generations record: the sampled ones where the file kept them
    (checked against the record's text, so a file whose ids and text disagree is refused), else
    the text encoded again."""
    ids = record.get("token_ids")
    if ids is None:
        return tokenizer.encode(record["text"], add_special_tokens=False)
    _check_ids(ids, len(tokenizer), where)
    if tokenizer.decode(ids, skip_special_tokens=False) != record["text"]:
        raise ValueError(f"{where}: field 'token_ids' does not decode to field 'text'; the record was altered "
                         "after sampling")
    return ids


def _eval_generations(path, tokenizer) -> RolloutSet:
    contents = generations.read(path)
    where0 = f"{path}:1"
    _check_tokenizer(contents.header, tokenizer, where0)
    suite = _suite_rows(contents.header, where0)
    rollouts = []
    for line_number, (key, record) in enumerate(contents.records.items(), 2):
        where = f"{path}:{line_number}"
        row = suite.get(record["problem_id"])
        if row is None:
            raise ValueError(f"{where}: problem {record['problem_id']!r} is not in the suite file")
        ids = _generation_ids(record, tokenizer, where)
        if not ids:
            continue  # an empty generation has no tokens to score
        problem = Problem(id=record["problem_id"], problem=str(row.get("problem", row.get("question", ""))),
                          solution=str(row.get("solution", "")), answer=str(row.get("answer", "")))
        rollouts.append(Rollout(problem, tuple(ids), record["sample_index"], where))
    if not rollouts:
        raise ValueError(f"{path}: no generations with text")
    # Suite order, then sample: the evaluator appends samples as they finish, and whatever is
    # computed over the rollouts (bootstrap intervals, a rollout limit) must not depend on that.
    rank = {problem_id: i for i, problem_id in enumerate(suite)}
    rollouts.sort(key=lambda r: (rank[r.problem.id], r.sample_index))
    header = contents.header
    # One switch for the evaluation; the teachers read the rollouts under the same template mode
    # (thinking off writes an empty think block into the prompt, which the completions follow).
    thinking = header.get("enable_thinking") is not False
    prompt = PromptSection(student_suffix=header.get("instruction") or "", student_thinking=thinking,
                           teacher_thinking=thinking)
    return RolloutSet(path, tuple(rollouts), prompt, prompt_opens_thinking=bool(header.get("thinking_open")))


def read_rollouts(path: str, tokenizer) -> RolloutSet:
    """Rollouts of either format; refuses another tokenizer's files, empty files and bad records,
    naming the file, line and field."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such rollouts file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (no header, no rollouts)")
    rows = _read_lines(path)
    kind = rows[0][1].get("format")
    if kind == generations.FORMAT:
        return _eval_generations(path, tokenizer)
    if kind == FORMAT:
        return _own_rollouts(path, rows, tokenizer)
    raise ValueError(f"{rows[0][0]}: field 'format' is {kind!r}; expected {FORMAT!r} (rollouts) or "
                     f"{generations.FORMAT!r} (eval generations)")
