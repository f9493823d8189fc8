"""Plots and comparison reports across eval runs (one run = one checkpoint's output folder)."""

from __future__ import annotations

import json
import os

import numpy as np

from opsd_jax.eval import metrics
from opsd_jax.eval.generations import write_atomic
from opsd_jax.eval.score import load_run_metrics


def plot_accuracy_vs_budget(runs: dict[str, dict[str, dict[int, dict]]], path: str) -> None:
    """One panel per suite, accuracy (avg@n) against token budget on a log2 axis, one line per run
    with its bootstrap 95% band. runs: {label: {suite: {budget: metrics}}}."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a TPU host
    import matplotlib.pyplot as plt

    suites = sorted({suite for results in runs.values() for suite in results})
    fig, axes = plt.subplots(1, len(suites), figsize=(4.2 * len(suites), 3.6), squeeze=False)
    for axis, suite in zip(axes[0], suites):
        all_budgets = sorted({b for results in runs.values() for b in results.get(suite, {})})
        for label, results in runs.items():
            by_budget = results.get(suite)
            if not by_budget:
                continue
            budgets = sorted(by_budget)
            accuracy = [by_budget[b]["accuracy"] for b in budgets]
            low = [by_budget[b]["accuracy_ci95"][0] for b in budgets]
            high = [by_budget[b]["accuracy_ci95"][1] for b in budgets]
            (line,) = axis.plot(budgets, accuracy, marker="o", label=label)
            axis.fill_between(budgets, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        axis.set_xscale("log", base=2)
        axis.set_xticks(all_budgets, [f"{b:,}" for b in all_budgets], rotation=30, fontsize=8)
        axis.minorticks_off()
        axis.set_title(suite)
        axis.set_xlabel("generation budget (tokens)")
        axis.set_ylabel("avg@n accuracy")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    temporary = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(temporary, dpi=120)
    plt.close(fig)
    os.replace(temporary, path)


def compare_runs(run_directories: list[str], labels: list[str] | None, out: str, *, resamples: int = 10_000,
                 grading: str = "strict") -> dict:
    """Compares every run with the first (the base) on each suite and budget both cover:
    absolute and relative accuracy differences with paired bootstrap 95% intervals over problems.
    Only metrics of one grading mode are read (score.metrics_folder), so runs graded differently
    are never compared; the mode is recorded in comparison.json and comparison.md.
    Writes comparison.json, comparison.md and accuracy_vs_budget.png under `out`."""
    if len(run_directories) < 2:
        raise ValueError("--compare needs at least two run folders (the first is the base)")
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_directories]
    if len(labels) != len(run_directories) or len(set(labels)) != len(labels):
        raise ValueError(f"need one distinct label per run, got {labels} for {len(run_directories)} runs")
    runs = {label: load_run_metrics(d, grading) for label, d in zip(labels, run_directories)}
    base_label = labels[0]
    rows = []
    for label in labels[1:]:
        for suite, by_budget in runs[label].items():
            for budget, other in sorted(by_budget.items()):
                base = runs[base_label].get(suite, {}).get(budget)
                if base is None:
                    continue
                base_acc = {p["id"]: p["accuracy"] for p in base["per_problem"]}
                other_acc = {p["id"]: p["accuracy"] for p in other["per_problem"]}
                if set(base_acc) != set(other_acc):
                    raise ValueError(f"{suite}: runs {base_label} and {label} cover different problems")
                ids = sorted(base_acc)
                difference = metrics.paired_difference(
                    np.array([base_acc[i] for i in ids]), np.array([other_acc[i] for i in ids]), resamples=resamples)
                rows.append({"suite": suite, "budget": budget, "base_run": base_label, "run": label, **difference})
    if not rows:
        raise ValueError(f"runs share no suite and budget with the base run {base_label}")
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "comparison.json"), json.dumps({"runs": dict(zip(labels, run_directories)),
                                                                   "grading": grading, "differences": rows},
                                                                  indent=1) + "\n")
    write_atomic(os.path.join(out, "comparison.md"), comparison_markdown(rows, grading))
    plot_accuracy_vs_budget(runs, os.path.join(out, "accuracy_vs_budget.png"))
    return {"grading": grading, "differences": rows}


def _interval(values) -> str:
    if values[0] is None:
        return "n/a"
    return f"[{values[0]:+.3f}, {values[1]:+.3f}]"


def comparison_markdown(rows: list[dict], grading: str = "strict") -> str:
    lines = [f"# Accuracy differences against the base run (paired bootstrap over problems, 95%; {grading} grading)", "",
             "| suite | budget | base | run | base acc | run acc | absolute [CI] | relative [CI] |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        relative = "n/a" if r["relative"] is None else f"{r['relative']:+.1%}"
        lines.append(f"| {r['suite']} | {r['budget']} | {r['base_run']} | {r['run']} | {r['base']:.4f} | "
                     f"{r['other']:.4f} | {r['absolute']:+.4f} {_interval(r['absolute_ci'])} | "
                     f"{relative} {_interval(r['relative_ci'])} |")
    return "\n".join(lines) + "\n"
