"""pass@k against brute-force enumeration, budget cuts, matrices and bootstrap intervals."""

import itertools
import math

import numpy as np
import pytest

from opsd_jax.eval.metrics import (
    accuracy_metrics, bootstrap_mean_interval, correctness_matrix, cut_at_budget, length_stats, pass_at_k,
    paired_difference,
)


def brute_force_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Share of the k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 12])
def test_pass_at_k_matches_enumeration(n, rng):
    for _ in range(4):
        outcomes = list(rng.random(n) < rng.random())
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(outcomes), k) == pytest.approx(brute_force_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(1024, 3, 8) == pytest.approx(1 - math.comb(1021, 8) / math.comb(1024, 8))
    for n, c, k in [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)]:
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(n, c, k)


def test_accuracy_metrics(rng):
    correct_PxN = rng.random((30, 16)) < 0.3
    metrics = accuracy_metrics(correct_PxN)
    assert metrics["avg@16"] == pytest.approx(correct_PxN.mean())
    assert metrics["pass@k"]["1"] == pytest.approx(correct_PxN.mean())  # pass@1 is avg@n
    expected16 = np.mean(correct_PxN.any(axis=1))
    assert metrics["pass@k"]["16"] == pytest.approx(expected16)
    values = [metrics["pass@k"][str(k)] for k in (1, 2, 4, 8, 16)]
    assert values == sorted(values)
    assert set(accuracy_metrics(correct_PxN[:, :4])["pass@k"]) == {"1", "2", "4"}


def synthetic_record(answer_at: int, total: int, finish="stop"):
    """A generation of `total` one-character tokens with the boxed answer starting at token
    `answer_at`; budget_chars as the runner records them (one character per token here)."""
    body = "x" * answer_at + "\\boxed{7}"
    text = (body + "y" * total)[:total]
    budgets = (4, 8, 16, 32)
    return {"problem_id": "p", "sample_index": 0, "text": text, "token_count": total, "finish_reason": finish,
            "budget_chars": {str(b): b for b in budgets if b < total}}


def test_budget_cut_on_synthetic_generations():
    from opsd_jax.eval.grader import grade

    # The answer ends at token answer_at + 9 (the length of "\boxed{7}").
    for answer_at, total in [(0, 12), (5, 20), (10, 40), (23, 40), (30, 33)]:
        record = synthetic_record(answer_at, total)
        for budget in (4, 8, 16, 32):
            text, tokens, hit_cap = cut_at_budget(record, budget)
            visible = answer_at + 9 <= min(budget, total)
            assert grade(text, "7", cut_off=hit_cap).correct == visible, (answer_at, total, budget)
            assert tokens == min(budget, total)
            assert hit_cap == (total > budget)
    exact = synthetic_record(0, 16, finish="length")
    assert cut_at_budget(exact, 16)[2] is True  # generated exactly up to a cap that stopped it
    assert cut_at_budget(synthetic_record(0, 16), 16)[2] is False  # stopped by itself at 16


def test_budget_not_recorded_is_an_error():
    with pytest.raises(ValueError, match="no cut recorded for budget 5"):
        cut_at_budget(synthetic_record(0, 20), 5)


def test_correctness_matrix_refuses_incomplete_runs():
    rows = [{"problem_id": p, "sample_index": i, "correct": i == 0} for p in "ab" for i in range(3)]
    matrix = correctness_matrix(rows, ["b", "a"])
    assert matrix.shape == (2, 3) and matrix[:, 0].all() and not matrix[:, 1:].any()
    with pytest.raises(ValueError, match=r"incomplete run.*a \(2 of 3\)"):
        correctness_matrix(rows[:2] + rows[3:], ["a", "b"])
    with pytest.raises(ValueError, match="sample indices"):
        correctness_matrix([{"problem_id": "a", "sample_index": 5, "correct": True}], ["a"])
    with pytest.raises(ValueError, match="unknown problem"):
        correctness_matrix(rows, ["a"])


def test_length_stats():
    stats = length_stats([10, 20, 40, 40], [False, False, True, True])
    assert stats == {"mean_tokens": 27.5, "median_tokens": 30.0, "max_tokens_seen": 40, "hit_cap_share": 0.5}


def test_bootstrap_intervals(rng):
    values = rng.random(30)
    low, high = bootstrap_mean_interval(values)
    assert low < values.mean() < high and high - low < 0.5
    base = rng.random(30)
    same = paired_difference(base, base)
    assert same["absolute"] == 0 and same["absolute_ci"] == [0, 0]
    better = paired_difference(base * 0.5, base)
    assert better["absolute"] > 0 and better["absolute_ci"][0] > 0
    assert better["relative"] == pytest.approx(1.0) and better["relative_ci"][0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different problem sets"):
        paired_difference(base, base[:5])
