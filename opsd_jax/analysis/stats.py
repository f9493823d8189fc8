"""Bootstrap confidence intervals over problems.

Rollouts of one problem are not independent draws (the paper's evaluation samples each problem 16
times, and a hard problem gives long, hesitant rollouts in all of them), so intervals resample
problems, each with all of its rollouts: a cluster bootstrap. Without problem ids every rollout is
its own cluster. Ratio statistics (markers per 1,000 tokens, fork rates) recompute
sum(numerator) / sum(denominator) over the resampled clusters, so long rollouts weigh as much as
their tokens.
"""

from __future__ import annotations

import numpy as np


def cluster_sums(values_B, clusters_B=None, order=None) -> np.ndarray:
    """float64[C]: values summed per cluster (clusters_B: one hashable id per row; None: each row
    its own). order: the cluster ids to return sums for, in that order (0 for an absent one)."""
    values_B = np.asarray(values_B, np.float64)
    if clusters_B is None:
        return values_B
    ids = list(dict.fromkeys(clusters_B)) if order is None else list(order)
    index = {c: i for i, c in enumerate(ids)}
    sums = np.zeros(len(ids), np.float64)
    np.add.at(sums, np.array([index[c] for c in clusters_B], np.int64), values_B)
    return sums


def _percentiles(stat_R, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    return tuple(float(x) for x in np.nanquantile(stat_R, [alpha, 1 - alpha]))


def ratio_ci(numerator_B, denominator_B, *, clusters_B=None, scale: float = 1.0, resamples: int = 2000,
             level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of scale * sum(numerator) / sum(denominator) over B rollouts,
    resampling their clusters (clusters_B: the problem of each rollout; None: rollouts)."""
    num_C = cluster_sums(numerator_B, clusters_B)
    den_C = cluster_sums(denominator_B, clusters_B)
    if num_C.size == 0 or den_C.sum() <= 0:
        return (float("nan"), float("nan"))
    index_RxC = np.random.default_rng(seed).integers(0, num_C.size, (resamples, num_C.size))
    den_R = den_C[index_RxC].sum(1)
    return _percentiles(scale * num_C[index_RxC].sum(1) / np.where(den_R > 0, den_R, np.nan), level)


def ratio_difference_ci(num_a_B, den_a_B, num_b_B, den_b_B, *, clusters_a_B=None, clusters_b_B=None,
                        scale: float = 1.0, resamples: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """CI of ratio(b) - ratio(a). With both groups' clusters (problems) given, the problems are
    resampled once for both, paired (a problem missing from a group adds nothing to it there);
    otherwise each group's rollouts are resampled independently."""
    if np.size(num_a_B) == 0 or np.size(num_b_B) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    if clusters_a_B is not None and clusters_b_B is not None:
        union = list(dict.fromkeys([*clusters_a_B, *clusters_b_B]))
        sums = [(cluster_sums(n, c, union), cluster_sums(d, c, union))
                for n, d, c in ((num_a_B, den_a_B, clusters_a_B), (num_b_B, den_b_B, clusters_b_B))]
        index_RxC = rng.integers(0, len(union), (resamples, len(union)))
        indices = (index_RxC, index_RxC)
    else:
        sums = [(np.asarray(n, np.float64), np.asarray(d, np.float64)) for n, d in ((num_a_B, den_a_B),
                                                                                  (num_b_B, den_b_B))]
        indices = tuple(rng.integers(0, n.size, (resamples, n.size)) for n, _ in sums)
    stats = []
    for (num_C, den_C), index_RxC in zip(sums, indices):
        den_R = den_C[index_RxC].sum(1)
        stats.append(scale * num_C[index_RxC].sum(1) / np.where(den_R > 0, den_R, np.nan))
    return _percentiles(stats[1] - stats[0], level)
