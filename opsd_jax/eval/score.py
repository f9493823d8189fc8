"""Grades a suite's generations at every token budget and writes metrics files.

Layout under a run's output folder:
  SUITE/generations.jsonl           samples (see generations.py)
  SUITE/metrics/budget-B.json       metrics at budget B (the full cap included)
  SUITE/grades.jsonl                per-sample grades at the full cap (answer, method, correct)
  summary.json, summary.md          every suite x budget; accuracy_vs_budget.png
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from opsd_jax.eval import grader, metrics
from opsd_jax.eval.generations import write_atomic
from opsd_jax.eval.suites import Suite


def budgets_for(header: dict) -> list[int]:
    """The budgets a generations file can be graded at: its recorded cuts and its cap."""
    return sorted(set(header["budgets"]) | {header["sampling"]["max_tokens"]})


def grade_records(records: list[dict], suite: Suite, budget: int, *, thinking_open: bool,
                  timeout_seconds: int = 5) -> list[dict]:
    """One grade row per record at one budget."""
    answers = suite.by_id()
    rows = []
    for record in records:
        problem = answers.get(record["problem_id"])
        if problem is None:
            raise ValueError(f"generation for problem {record['problem_id']!r}, which suite {suite.name} lacks")
        text, tokens, hit_cap = metrics.cut_at_budget(record, budget)
        g = grader.grade(text, problem.answer, cut_off=hit_cap, thinking_open=thinking_open,
                         timeout_seconds=timeout_seconds)
        rows.append({"problem_id": record["problem_id"], "sample_index": record["sample_index"],
                     "correct": g.correct, "answer": g.answer, "method": g.method, "timed_out": g.timed_out,
                     "tokens": tokens, "hit_cap": hit_cap})
    return rows


def budget_metrics(rows: list[dict], suite: Suite, budget: int, ks=metrics.DEFAULT_KS) -> dict:
    """metrics.json content for one suite at one budget."""
    problem_ids = [p.id for p in suite.problems]
    correct_PxN = metrics.correctness_matrix(rows, problem_ids)
    boxed_PxN = metrics.correctness_matrix(
        [dict(r, correct=r["correct"] and r["method"] == grader.BOXED) for r in rows], problem_ids)
    n = correct_PxN.shape[1]
    result = {"suite": suite.name, "budget": budget, **metrics.accuracy_metrics(correct_PxN, ks)}
    result["accuracy"] = result[f"avg@{n}"]
    result["accuracy_ci95"] = list(metrics.bootstrap_mean_interval(correct_PxN.mean(axis=1)))
    result["accuracy_boxed_only"] = float(boxed_PxN.mean())
    methods = collections.Counter(r["method"] for r in rows)
    result["extraction"] = {m: methods.get(m, 0) for m in grader.METHODS}
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
                timeout_seconds: int = 5) -> dict[int, dict]:
    """Grades at every budget, writes SUITE/metrics/budget-B.json and SUITE/grades.jsonl."""
    results = {}
    budgets = budgets_for(header)
    for budget in budgets:
        rows = grade_records(records, suite, budget, thinking_open=header["thinking_open"],
                             timeout_seconds=timeout_seconds)
        result = budget_metrics(rows, suite, budget)
        result["sampling"] = header["sampling"]
        result["checkpoint"] = header.get("checkpoint")
        write_atomic(os.path.join(directory, "metrics", f"budget-{budget}.json"), json.dumps(result, indent=1) + "\n")
        results[budget] = result
        if budget == budgets[-1]:
            write_atomic(os.path.join(directory, "grades.jsonl"),
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return results


def load_run_metrics(run_directory: str) -> dict[str, dict[int, dict]]:
    """{suite: {budget: metrics}} from a run's output folder."""
    found: dict[str, dict[int, dict]] = {}
    if not os.path.isdir(run_directory):
        raise FileNotFoundError(f"{run_directory}: not a directory")
    for suite in sorted(os.listdir(run_directory)):
        folder = os.path.join(run_directory, suite, "metrics")
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith("budget-") and name.endswith(".json"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    result = json.load(f)
                found.setdefault(suite, {})[int(result["budget"])] = result
    if not found:
        raise FileNotFoundError(f"{run_directory}: no SUITE/metrics/budget-*.json files (run or merge the eval first)")
    return found


def summary_markdown(results: dict[str, dict[int, dict]], title: str) -> str:
    """A table per run: suite x budget with avg@n, its interval, pass@k, lengths and cap share."""
    lines = [f"# {title}", "", "| suite | budget | avg@n [95% CI] | boxed only | pass@k | mean / median tokens | hit cap |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for suite, by_budget in results.items():
        for budget, m in sorted(by_budget.items()):
            low, high = m["accuracy_ci95"]
            passes = ", ".join(f"@{k} {v:.3f}" for k, v in m["pass@k"].items())
            length = m["length"]
            lines.append(
                f"| {suite} | {budget} | {m['accuracy']:.4f} [{low:.3f}, {high:.3f}] (n={m['samples_per_problem']}) | "
                f"{m['accuracy_boxed_only']:.4f} | {passes} | {length['mean_tokens']:.0f} / {length['median_tokens']:.0f} "
                f"| {length['hit_cap_share']:.1%} |")
    return "\n".join(lines) + "\n"
