"""avg@k, unbiased pass@k, response-length statistics, budget cuts and bootstrap intervals.

Shape letters: P problems, N samples per problem, R bootstrap resamples.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

DEFAULT_KS = (1, 2, 4, 8, 16)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): the chance that k of n samples, drawn without
    replacement, include at least one of the c correct ones: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # The product form avoids the huge binomials of n = 16..1024.
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def cut_at_budget(record: dict, budget: int) -> tuple[str, int, bool]:
    """(text, tokens, hit the cap) of one generation record as if generation had stopped after
    `budget` tokens. An answer written after the cut is gone, so it is judged wrong.

    record: a generations-file row with `text`, `token_count`, `finish_reason` and
    `budget_chars` (characters of the text that the first B tokens decode to, for each budget B
    shorter than the generation).
    """
    count = record["token_count"]
    if count <= budget:
        return record["text"], count, count == budget and record["finish_reason"] == "length"
    chars = record["budget_chars"].get(str(budget))
    if chars is None:
        raise ValueError(
            f"problem {record['problem_id']} sample {record['sample_index']}: no cut recorded for budget {budget} "
            f"(recorded: {sorted(int(b) for b in record['budget_chars'])}); budgets must be chosen at generation time"
        )
    return record["text"][:chars], budget, True


def length_stats(tokens: list[int], hit_cap: list[bool]) -> dict:
    """Mean and median response length in tokens and the share of responses cut by the cap."""
    if not tokens:
        raise ValueError("no responses to measure")
    return {
        "mean_tokens": float(statistics.fmean(tokens)),
        "median_tokens": float(statistics.median(tokens)),
        "max_tokens_seen": int(max(tokens)),
        "hit_cap_share": float(sum(hit_cap) / len(hit_cap)),
    }


def correctness_matrix(graded: list[dict], problem_ids: list[str]) -> np.ndarray:
    """bool[P, N] correctness, rows in `problem_ids` order, columns by sample index.

    Every problem must have the same samples 0..N-1, or the run is incomplete and metrics would
    silently weigh problems unequally.
    """
    by_problem: dict[str, dict[int, bool]] = {pid: {} for pid in problem_ids}
    for row in graded:
        if row["problem_id"] not in by_problem:
            raise ValueError(f"graded sample for unknown problem {row['problem_id']!r}")
        by_problem[row["problem_id"]][row["sample_index"]] = bool(row["correct"])
    counts = {pid: len(samples) for pid, samples in by_problem.items()}
    n = max(counts.values(), default=0)
    short = [f"{pid} ({c} of {n})" for pid, c in counts.items() if c != n]
    if n == 0 or short:
        raise ValueError(f"incomplete run: problems with fewer samples than the others: {', '.join(short[:5]) or 'all'}"
                         f"{' ...' if len(short) > 5 else ''}; resume generation first")
    correct_PxN = np.zeros((len(problem_ids), n), bool)
    for row, pid in enumerate(problem_ids):
        if sorted(by_problem[pid]) != list(range(n)):
            raise ValueError(f"problem {pid}: sample indices {sorted(by_problem[pid])} are not 0..{n - 1}")
        correct_PxN[row] = [by_problem[pid][i] for i in range(n)]
    return correct_PxN


def accuracy_metrics(correct_PxN: np.ndarray, ks=DEFAULT_KS) -> dict:
    """avg@N (mean correctness over every sample) and pass@k for each k <= N, averaged over problems."""
    problems, n = correct_PxN.shape
    counts_P = correct_PxN.sum(axis=1)
    return {
        "problems": int(problems),
        "samples_per_problem": int(n),
        f"avg@{n}": float(correct_PxN.mean()),
        "pass@k": {str(k): float(np.mean([pass_at_k(n, int(c), k) for c in counts_P])) for k in ks if k <= n},
    }


def bootstrap_mean_interval(values_P: np.ndarray, *, resamples: int = 10_000, confidence: float = 0.95,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of per-problem values, problems resampled with replacement."""
    values_P = np.asarray(values_P, float)
    draws_RxP = np.random.default_rng(seed).integers(0, len(values_P), (resamples, len(values_P)))
    means_R = values_P[draws_RxP].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means_R, tail)), float(np.quantile(means_R, 1 - tail))


def paired_difference(base_P: np.ndarray, other_P: np.ndarray, *, resamples: int = 10_000,
                      confidence: float = 0.95, seed: int = 0) -> dict:
    """Absolute and relative difference of mean per-problem accuracy (other - base), with paired
    bootstrap intervals: the same resampled problems feed both runs, so problem difficulty, the
    largest source of variance, cancels."""
    base_P, other_P = np.asarray(base_P, float), np.asarray(other_P, float)
    if base_P.shape != other_P.shape:
        raise ValueError(f"runs cover different problem sets ({base_P.shape[0]} vs {other_P.shape[0]} problems)")
    draws_RxP = np.random.default_rng(seed).integers(0, len(base_P), (resamples, len(base_P)))
    base_R, other_R = base_P[draws_RxP].mean(axis=1), other_P[draws_RxP].mean(axis=1)
    tail = (1 - confidence) / 2
    base, other = float(base_P.mean()), float(other_P.mean())
    absolute_R = other_R - base_R
    with np.errstate(divide="ignore", invalid="ignore"):
        relative_R = np.where(base_R > 0, absolute_R / base_R, np.nan)
    finite_R = relative_R[np.isfinite(relative_R)]
    relative_ci = (
        [float(np.quantile(finite_R, tail)), float(np.quantile(finite_R, 1 - tail))] if len(finite_R) else [None, None]
    )
    return {
        "base": base,
        "other": other,
        "absolute": other - base,
        "absolute_ci": [float(np.quantile(absolute_R, tail)), float(np.quantile(absolute_R, 1 - tail))],
        "relative": (other - base) / base if base > 0 else None,
        "relative_ci": relative_ci,
        "confidence": confidence,
    }
