import numpy as np
import pytest

from opsd_jax.analysis import stats
from opsd_jax.analysis.forks import fork_rates, fork_threshold, thinking_mask


def test_fork_rates_split_by_span():
    entropy = np.array([[0.1, 0.9, 2.0, 0.5, 0.7, 9.0],
                        [1.0, 0.2, 0.3, 0.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], bool)  # 9.0 is padding
    thinking = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    rates = fork_rates(entropy, mask, thinking, 0.672)
    counts = {span: {k: rates[span][k] for k in ("fork_rate", "forks", "tokens")} for span in rates}
    assert counts["all"] == {"fork_rate": 4 / 8, "forks": 4, "tokens": 8}
    assert counts["thinking"] == {"fork_rate": 3 / 6, "forks": 3, "tokens": 6}
    assert counts["answer"] == {"fork_rate": 1 / 2, "forks": 1, "tokens": 2}
    # rollout 0: 3 forks / 5 tokens, rollout 1: 1 / 3; the bootstrap range spans [1/3, 3/5]
    low, high = rates["all"]["fork_rate_ci95"]
    assert 1 / 3 <= low <= 0.5 <= high <= 3 / 5
    none = fork_rates(entropy, mask, np.zeros_like(mask), 0.672)
    assert none["thinking"]["fork_rate"] is None and none["thinking"]["tokens"] == 0


def test_top_rho_quantile_marks_that_share(rng):
    entropy = rng.permutation(np.arange(100, dtype=np.float64)).reshape(4, 25)
    mask = np.ones_like(entropy, bool)
    threshold = fork_threshold(entropy, mask, top_rho=0.2)
    assert threshold == 79.0
    assert fork_rates(entropy, mask, mask, threshold)["all"]["fork_rate"] == pytest.approx(0.2)
    # padding does not move the quantile
    padded = np.concatenate([entropy, np.full((4, 5), 1e6)], 1)
    assert fork_threshold(padded, np.concatenate([mask, np.zeros((4, 5), bool)], 1), top_rho=0.2) == 79.0
    assert fork_threshold(entropy, mask, threshold=0.5) == 0.5
    with pytest.raises(ValueError, match="top_rho"):
        fork_threshold(entropy, mask, top_rho=0.0)


def _pieces(*pieces):
    return "".join(pieces), np.cumsum([len(p) for p in pieces])


def test_thinking_mask():
    assert thinking_mask(*_pieces("a", " b", "</think>", "\n\n", "c"), False).tolist() == [True] * 3 + [False] * 2
    # OLMo-3 spells the tags over several tokens: the span ends at the token completing "</think>".
    assert thinking_mask(*_pieces("a", "</", "think", ">\n", "c"), False).tolist() == [True] * 4 + [False]
    assert thinking_mask(*_pieces("a", "</", "think", ">", "</think>", "c"), True).tolist() == [True] * 4 + [False] * 2
    assert thinking_mask(*_pieces("<", "think", ">", "a", "b"), False).all()  # truncated mid-thought
    assert thinking_mask(*_pieces("a", "b"), True).all()  # the prompt opened <think>
    assert not thinking_mask(*_pieces("a", "b"), False).any()  # did not think


def test_bootstrap_ratio_ci_covers_and_shrinks(rng):
    counts = rng.poisson(3.0, 400)
    tokens = np.full(400, 1000)
    low, high = stats.ratio_ci(counts, tokens, scale=1000)
    point = 1000 * counts.sum() / tokens.sum()
    assert low < point < high and high - low < 0.6
    low_d, high_d = stats.ratio_difference_ci(counts, tokens, counts + 2, tokens, scale=1000)
    assert low_d < 2.0 < high_d and low_d > 1.0


def test_top_rho_threshold_is_the_base_groups_for_every_group(rng):
    """With top_rho, one threshold from the first group's student entropies: a group whose
    student hesitates less has fewer forks (a threshold per group would pin every rate to rho)."""
    from opsd_jax.analysis.analyze import AnalysisSettings, group_metrics
    from opsd_jax.analysis.score import TokenScores

    def group(scale):
        lengths = (300, 200, 250)
        scores = [{f: (rng.exponential(scale, n) if f.endswith("entropy") else np.zeros(n)).astype(np.float32)
                   for f in TokenScores._fields} for n in lengths]
        return [list(range(n)) for n in lengths], scores, [[] for _ in lengths], [np.zeros(n, bool) for n in lengths]

    settings = AnalysisSettings(top_rho=0.2)
    base = group_metrics(*group(1.0), ("hedging",), settings)
    assert base["fork_rates"]["student"]["all"]["fork_rate"] == pytest.approx(0.2, abs=0.01)
    calmer = group_metrics(*group(0.5), ("hedging",), settings, base["fork_threshold_nats"], "base")
    assert calmer["fork_threshold_nats"] == base["fork_threshold_nats"]
    assert calmer["fork_rates"]["student"]["all"]["fork_rate"] < 0.1  # exp(-2 x 1.61) ~ 0.04
    own = group_metrics(*group(0.5), ("hedging",), settings)  # its own quantile: rho again
    assert own["fork_rates"]["student"]["all"]["fork_rate"] == pytest.approx(0.2, abs=0.01)
