"""Grades a suite's generations at every token budget and writes metrics files.

Layout under a run's output folder:
  SUITE/generations.jsonl           samples (see generations.py)
  SUITE/metrics/budget-B.json       metrics at budget B (the full cap included), strict grading
  SUITE/grades.jsonl                per-sample grades at the full cap (answer, method, correct)
  SUITE/metrics-paper/, SUITE/grades-paper.jsonl   the same under paper grading
  summary.json, summary.md          every suite x budget (x grading); accuracy_vs_budget.png

Grading modes (every metrics file records its mode under "grading"):
  strict  grader.py: the final section first, and a response cut by a budget gets no phrase or
          last-number fallback.
  paper   paper_grader.py: the paper's extract_answer_math / strip_string / math_equal on the
          whole text; a response cut at a budget is graded exactly like a finished one, as the
          paper's run_budget_sweep.py does (which cuts by re-tokenising the decoded text, where
          this repo cuts at the recorded characters of the first B sampled tokens).
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from opsd_jax.eval import countdown, grader, metrics, paper_grader
from opsd_jax.eval.generations import write_atomic
from opsd_jax.eval.suites import Suite


STRICT, PAPER = "strict", "paper"
GRADINGS = (STRICT, PAPER)


def parse_gradings(text) -> tuple[str, ...]:
    """Grading modes from "strict", "paper" or a comma-separated list ("strict,paper"); the first
    is the primary one (plotted, returned and compared)."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip()) if isinstance(text, str) else tuple(text)
    unknown = [m for m in modes if m not in GRADINGS]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise ValueError(f"--grading must be one or more distinct modes of {', '.join(GRADINGS)}, got {text!r}")
    return modes


def metrics_folder(grading: str) -> str:
    """A suite's metrics folder for a grading mode (strict keeps the original name)."""
    return "metrics" if grading == STRICT else f"metrics-{grading}"


def grades_file(grading: str) -> str:
    return "grades.jsonl" if grading == STRICT else f"grades-{grading}.jsonl"


def budgets_for(header: dict) -> list[int]:
    """The budgets a generations file can be graded at: its recorded cuts and its cap."""
    return sorted(set(header["budgets"]) | {header["sampling"]["max_tokens"]})


def grade_records(records: list[dict], suite: Suite, budget: int, *, thinking_open: bool,
                  timeout_seconds: int = 5, grading: str = STRICT) -> list[dict]:
    """One grade row per record at one budget. `timeout_seconds` applies to strict grading; paper
    grading uses the paper's 1 s limit on its symbolic check."""
    parse_gradings([grading])
    answers = suite.by_id()
    task = paper_grader.task_for_suite(suite.name) if grading == PAPER and suite.kind == "math" else None
    rows = []
    for record in records:
        problem = answers.get(record["problem_id"])
        if problem is None:
            raise ValueError(f"generation for problem {record['problem_id']!r}, which suite {suite.name} lacks")
        text, tokens, hit_cap = metrics.cut_at_budget(record, budget)
        if suite.kind == "countdown":  # paper: the release's rule, strict: the authors' correction of it
            g = countdown.grade(text, problem.answer, release_rule=grading == PAPER)
        elif grading == PAPER:  # the cut text is graded like a finished response: no cut_off
            g = paper_grader.grade(text, problem.answer, task=task)
        else:
            g = grader.grade(text, problem.answer, cut_off=hit_cap, thinking_open=thinking_open,
                             timeout_seconds=timeout_seconds)
        rows.append({"problem_id": record["problem_id"], "sample_index": record["sample_index"],
                     "correct": g.correct, "answer": g.answer, "method": g.method, "timed_out": g.timed_out,
                     "tokens": tokens, "hit_cap": hit_cap})
    return rows


def budget_metrics(rows: list[dict], suite: Suite, budget: int, ks=metrics.DEFAULT_KS, *,
                   grading: str = STRICT) -> dict:
    """metrics.json content for one suite at one budget, graded under `grading`."""
    problem_ids = [p.id for p in suite.problems]
    correct_PxN = metrics.correctness_matrix(rows, problem_ids)
    boxed_PxN = metrics.correctness_matrix(
        [dict(r, correct=r["correct"] and r["method"] == grader.BOXED) for r in rows], problem_ids)
    n = correct_PxN.shape[1]
    result = {"suite": suite.name, "budget": budget, "grading": grading,
              **metrics.accuracy_metrics(correct_PxN, ks)}
    result["accuracy"] = result[f"avg@{n}"]
    result["accuracy_ci95"] = list(metrics.bootstrap_mean_interval(correct_PxN.mean(axis=1)))
    result["accuracy_boxed_only"] = float(boxed_PxN.mean())
    methods = collections.Counter(r["method"] for r in rows)
    result["extraction"] = {**{m: methods.get(m, 0) for m in grader.METHODS}, **methods}
    result["timeouts"] = sum(r["timed_out"] for r in rows)
    result["length"] = metrics.length_stats([r["tokens"] for r in rows], [r["hit_cap"] for r in rows])
    by_problem = collections.defaultdict(list)
    for r in rows:
        by_problem[r["problem_id"]].append(r)
    table = []
    for row, problem in enumerate(suite.problems):
        samples = by_problem[problem.id]
        answers = collections.Counter(r["answer"] for r in samples if r["answer"] is not None)
        table.append({
            "id": problem.id, "answer": problem.answer,
            "correct": int(correct_PxN[row].sum()), "samples": n,
            "accuracy": float(correct_PxN[row].mean()),
            "mean_tokens": float(np.mean([r["tokens"] for r in samples])),
            "hit_cap_share": float(np.mean([r["hit_cap"] for r in samples])),
            "top_answer": answers.most_common(1)[0][0] if answers else None,
        })
    result["per_problem"] = table
    return result


def score_suite(records: list[dict], header: dict, suite: Suite, directory: str, *,
                timeout_seconds: int = 5, grading: str = STRICT) -> dict[int, dict]:
    """Grades at every budget under one grading mode, writes SUITE/<metrics_folder>/budget-B.json
    and SUITE/<grades_file> (metrics/ and grades.jsonl for strict).

    The metrics folder is replaced whole once every budget is graded, so a kill never leaves some
    budgets of this grading beside others of an earlier one (which `load_run_metrics` and
    `eval --compare` would read as one run)."""
    from opsd_jax.checkpoint.atomic import atomic_directory  # jax: imported when grading, not with this module

    results = {}
    for budget in budgets_for(header):
        rows = grade_records(records, suite, budget, thinking_open=header["thinking_open"],
                             timeout_seconds=timeout_seconds, grading=grading)
        result = budget_metrics(rows, suite, budget, grading=grading)
        result["sampling"] = header["sampling"]
        result["checkpoint"] = header.get("checkpoint")
        results[budget] = result
    with atomic_directory(os.path.join(directory, metrics_folder(grading)), overwrite=True, local=True) as staging:
        for budget, result in results.items():
            write_atomic(os.path.join(staging, f"budget-{budget}.json"), json.dumps(result, indent=1) + "\n")
    write_atomic(os.path.join(directory, grades_file(grading)),
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return results


def load_run_metrics(run_directory: str, grading: str = STRICT) -> dict[str, dict[int, dict]]:
    """{suite: {budget: metrics}} of one grading mode from a run's output folder. Files written
    before modes existed carry no "grading" and count as strict; a file recording another mode
    than its folder's is refused rather than compared."""
    parse_gradings([grading])
    found: dict[str, dict[int, dict]] = {}
    if not os.path.isdir(run_directory):
        raise FileNotFoundError(f"{run_directory}: not a directory")
    for suite in sorted(os.listdir(run_directory)):
        folder = os.path.join(run_directory, suite, metrics_folder(grading))
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith("budget-") and name.endswith(".json"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    result = json.load(f)
                recorded = result.get("grading", STRICT)
                if recorded != grading:
                    raise ValueError(f"{os.path.join(folder, name)}: graded {recorded!r}, expected {grading!r}")
                found.setdefault(suite, {})[int(result["budget"])] = result
    if not found:
        raise FileNotFoundError(f"{run_directory}: no SUITE/{metrics_folder(grading)}/budget-*.json files "
                                f"({grading} grading; run, merge or --score-only with --grading {grading} first)")
    return found


def summary_markdown(results_by_grading: dict[str, dict[str, dict[int, dict]]], title: str) -> str:
    """A table per run: suite x budget x grading mode with avg@n, its interval, pass@k, lengths
    and cap share. results_by_grading: {grading: {suite: {budget: metrics}}}; modes graded
    together sit in adjacent rows."""
    lines = [f"# {title}", "",
             "| suite | budget | grading | avg@n [95% CI] | boxed only | pass@k | mean / median tokens | hit cap |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    suites = list(dict.fromkeys(s for results in results_by_grading.values() for s in results))
    for suite in suites:
        budgets = sorted({b for results in results_by_grading.values() for b in results.get(suite, {})})
        for budget in budgets:
            for grading, results in results_by_grading.items():
                m = results.get(suite, {}).get(budget)
                if m is None:
                    continue
                low, high = m["accuracy_ci95"]
                passes = ", ".join(f"@{k} {v:.3f}" for k, v in m["pass@k"].items())
                length = m["length"]
                lines.append(
                    f"| {suite} | {budget} | {grading} | {m['accuracy']:.4f} [{low:.3f}, {high:.3f}] "
                    f"(n={m['samples_per_problem']}) | {m['accuracy_boxed_only']:.4f} | {passes} | "
                    f"{length['mean_tokens']:.0f} / {length['median_tokens']:.0f} | {length['hit_cap_share']:.1%} |")
    return "\n".join(lines) + "\n"
