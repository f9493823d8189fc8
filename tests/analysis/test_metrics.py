"""Where the per-token divergence sits: forks, markers, shares, against hand-computed values."""

import numpy as np
import pytest

from opsd_jax.analysis.metrics import divergence_summary


def test_divergence_summary_pools_tokens_and_finds_the_share_at_forks():
    rng = np.random.default_rng()
    d_BxT = rng.uniform(0.0, 1.0, (3, 5))
    mask_BxT = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
    d_BxT[~mask_BxT] = np.nan  # past a rollout's end nothing may leak in, not even a NaN
    fork_BxT = np.array([[1, 0, 0, 1, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 1]], bool)  # forks past the end do not count
    picks = {"any": (np.array([0, 0, 2]), np.array([1, 3, 0])), "hedging": (np.array([], int), np.array([], int))}
    out = divergence_summary(d_BxT, mask_BxT, fork_BxT, picks, seed=1)

    real = d_BxT[mask_BxT]
    forks = [d_BxT[0, 0], d_BxT[0, 3], d_BxT[1, 1]]
    assert out["all"]["tokens"] == 10 and out["all"]["mean"] == pytest.approx(real.mean())
    assert out["at_forks"]["tokens"] == 3 and out["at_forks"]["mean"] == pytest.approx(np.mean(forks))
    assert out["off_forks"]["tokens"] == 7
    assert out["off_forks"]["mean"] == pytest.approx((real.sum() - sum(forks)) / 7)
    assert out["share_at_forks"] == pytest.approx(sum(forks) / real.sum())
    assert out["fork_share_of_tokens"] == pytest.approx(0.3)
    assert out["concentration_at_forks"] == pytest.approx(out["share_at_forks"] / 0.3)
    marker = out["at_markers"]["any"]
    assert marker["positions"] == 3
    assert marker["mean"] == pytest.approx(np.mean([d_BxT[0, 1], d_BxT[0, 3], d_BxT[2, 0]]))
    low, high = marker["ci95"]
    assert low <= marker["mean"] <= high
    assert out["at_markers"]["hedging"] == {"positions": 0}


def test_divergence_summary_without_forks_or_divergence():
    mask_BxT = np.ones((2, 3), bool)
    out = divergence_summary(np.zeros((2, 3)), mask_BxT, np.zeros((2, 3), bool), {}, seed=0)
    assert out["at_forks"] == {"tokens": 0, "mean": None, "ci95": [None, None]}
    assert out["share_at_forks"] is None and out["fork_share_of_tokens"] == 0.0
    assert out["concentration_at_forks"] is None
    # A teacher equal to the student leaves float32 residue, not a divergence to share out.
    residue = np.full((2, 3), 1e-15)
    forks = np.array([[1, 0, 0], [0, 0, 0]], bool)
    out = divergence_summary(residue, mask_BxT, forks, {}, seed=0)
    assert out["share_at_forks"] is None and out["concentration_at_forks"] is None
    assert out["fork_share_of_tokens"] == pytest.approx(1 / 6)
