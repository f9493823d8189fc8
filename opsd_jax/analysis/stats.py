"""Bootstrap confidence intervals over rollouts (the unit that was sampled independently).

Ratio statistics (markers per 1,000 tokens, fork rates) resample whole rollouts and recompute
sum(numerator) / sum(denominator), so long rollouts weigh as much as their tokens.
"""

from __future__ import annotations

import numpy as np


def ratio_ci(numerator_B, denominator_B, *, scale: float = 1.0, resamples: int = 2000, level: float = 0.95,
             seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of scale * sum(numerator) / sum(denominator) over B rollouts."""
    num_B = np.asarray(numerator_B, np.float64)
    den_B = np.asarray(denominator_B, np.float64)
    if num_B.size == 0 or den_B.sum() <= 0:
        return (float("nan"), float("nan"))
    index_RxB = np.random.default_rng(seed).integers(0, num_B.size, (resamples, num_B.size))
    den_R = den_B[index_RxB].sum(1)
    stat_R = scale * num_B[index_RxB].sum(1) / np.where(den_R > 0, den_R, np.nan)
    alpha = (1 - level) / 2
    return tuple(float(x) for x in np.nanquantile(stat_R, [alpha, 1 - alpha]))


def ratio_difference_ci(num_a_B, den_a_B, num_b_B, den_b_B, *, scale: float = 1.0, resamples: int = 2000,
                        level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """CI of ratio(b) - ratio(a), resampling the two groups' rollouts independently."""
    rng = np.random.default_rng(seed)
    stats = []
    for num_B, den_B in ((num_a_B, den_a_B), (num_b_B, den_b_B)):
        num_B, den_B = np.asarray(num_B, np.float64), np.asarray(den_B, np.float64)
        if num_B.size == 0:
            return (float("nan"), float("nan"))
        index_RxB = rng.integers(0, num_B.size, (resamples, num_B.size))
        den_R = den_B[index_RxB].sum(1)
        stats.append(scale * num_B[index_RxB].sum(1) / np.where(den_R > 0, den_R, np.nan))
    alpha = (1 - level) / 2
    return tuple(float(x) for x in np.nanquantile(stats[1] - stats[0], [alpha, 1 - alpha]))
