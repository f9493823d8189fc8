"""Aggregates over rollouts: marker rates per 1,000 tokens, base-vs-trained differences, and the
teacher's token-level signal at reconsideration tokens, each with bootstrap CIs over problems
(`problems_B`: each rollout's problem id; None: over rollouts)."""

from __future__ import annotations

import numpy as np

from opsd_jax.analysis import stats


def marker_table(rows: list[tuple[int, dict[str, int]]], categories, *, seed: int = 0, problems_B=None) -> dict:
    """rows: (completion tokens, {category: count}) per rollout.

    Returns {category: {"count", "tokens", "per_1k_tokens", "per_1k_ci95"}} plus "any" (all
    categories together); rates pool counts and tokens over rollouts (length-normalized).
    """
    tokens_B = np.array([n for n, _ in rows], np.float64)
    table = {}
    for category in list(categories) + ["any"]:
        count_B = np.array([sum(c.values()) if category == "any" else c[category] for _, c in rows], np.float64)
        total = tokens_B.sum()
        table[category] = {
            "count": int(count_B.sum()), "tokens": int(total),
            "per_1k_tokens": float(1000 * count_B.sum() / total) if total else None,
            "per_1k_ci95": list(stats.ratio_ci(count_B, tokens_B, clusters_B=problems_B, scale=1000, seed=seed)),
        }
    return table


def marker_difference(base_rows, rows, categories, *, seed: int = 0, base_problems_B=None, problems_B=None) -> dict:
    """{category: {"difference", "ci95"}}: per-1k-token rate of `rows` minus that of `base_rows`;
    with both groups' problem ids the interval resamples problems, paired between the groups."""
    out = {}
    for category in list(categories) + ["any"]:
        def arrays(group):
            count = [sum(c.values()) if category == "any" else c[category] for _, c in group]
            return np.array(count, np.float64), np.array([n for n, _ in group], np.float64)

        (ca, ta), (cb, tb) = arrays(base_rows), arrays(rows)
        difference = 1000 * (cb.sum() / tb.sum() - ca.sum() / ta.sum())
        out[category] = {"difference": float(difference),
                         "ci95": list(stats.ratio_difference_ci(ca, ta, cb, tb, clusters_a_B=base_problems_B,
                                                                clusters_b_B=problems_B, scale=1000, seed=seed))}
    return out


def _mean_over_positions(values_N, rollout_N, seed: int, problems_B=None) -> dict:
    """{"mean", "ci95"} of values at N positions; the CI resamples problems (or rollouts without
    problems_B), since positions in one rollout, and rollouts of one problem, are not independent."""
    rollout_N = np.asarray(rollout_N)
    clusters_N = rollout_N if problems_B is None else np.asarray(problems_B, object)[rollout_N]
    return {"mean": float(np.mean(values_N)),
            "ci95": list(stats.ratio_ci(values_N, np.ones(len(rollout_N)), clusters_B=clusters_N.tolist(),
                                        seed=seed))}


def signal_summary(privileged_N, vanilla_N, rollout_N, *, seed: int = 0, problems_B=None) -> dict:
    """Token-level advantages log p_T(y_t) - log p_S(y_t) at N reconsideration positions.

    privileged_N / vanilla_N: float[N] under the privileged / vanilla teacher; rollout_N: int[N]
    which rollout each position came from; problems_B: each rollout's problem (CIs resample
    problems, or rollouts without them: positions in one rollout are not independent).
    sign_disagreement: share of positions where the two advantages have opposite signs (a zero
    advantage agrees with nothing but zero).
    """
    privileged_N = np.asarray(privileged_N, np.float64)
    vanilla_N = np.asarray(vanilla_N, np.float64)
    rollout_N = np.asarray(rollout_N)
    n = privileged_N.size
    if n == 0:
        return {"positions": 0}

    def mean_and_ci(values_N):
        return _mean_over_positions(values_N, rollout_N, seed, problems_B)

    disagreement = mean_and_ci((np.sign(privileged_N) != np.sign(vanilla_N)).astype(np.float64))
    return {
        "positions": int(n), "rollouts": int(np.unique(rollout_N).size),
        "privileged": mean_and_ci(privileged_N), "vanilla": mean_and_ci(vanilla_N),
        "privileged_minus_vanilla": mean_and_ci(privileged_N - vanilla_N),
        "sign_disagreement": disagreement["mean"], "sign_disagreement_ci95": disagreement["ci95"],
        "privileged_negative_vanilla_positive": float(np.mean((privileged_N < 0) & (vanilla_N > 0))),
    }


# Nats per token below which a group's divergence counts as none (the kernel keeps digits down to
# about 1e-7: BUILD_NOTES, "The JSD of nearly equal distributions keeps its digits").
NO_DIVERGENCE_PER_TOKEN = 1e-9


def divergence_summary(divergence_BxT, mask_BxT, fork_BxT, marker_picks, *, seed: int = 0, problems_B=None) -> dict:
    """Where the trainer's per-token divergence (its full-vocabulary objective) sits in a group.

    divergence_BxT: float[B, T] between the student and one teacher; mask_BxT: bool[B, T] real
    tokens; fork_BxT: bool[B, T] the student's forks; marker_picks: {category: (rollout_N,
    position_N)} each marker's first token. Means are per token, pooled over rollouts, with
    bootstrap CIs over problems (problems_B; None: over rollouts). share_at_forks: the part of
    the group's summed divergence that sits at forks, against fork_share_of_tokens, the part of its tokens that are forks: a
    concentration above 1 means the objective pulls hardest where the student hesitates. The
    share is None where the group has no divergence to share (NO_DIVERGENCE_PER_TOKEN).
    """
    d_BxT = np.where(mask_BxT, np.asarray(divergence_BxT, np.float64), 0.0)
    mask_BxT = np.asarray(mask_BxT, bool)
    fork_BxT = np.asarray(fork_BxT, bool) & mask_BxT

    def pooled(where_BxT):
        count_B = where_BxT.sum(1).astype(np.float64)
        if not count_B.sum():
            return {"tokens": 0, "mean": None, "ci95": [None, None]}
        sum_B = (d_BxT * where_BxT).sum(1)
        return {"tokens": int(count_B.sum()), "mean": float(sum_B.sum() / count_B.sum()),
                "ci95": list(stats.ratio_ci(sum_B, count_B, clusters_B=problems_B, seed=seed))}

    total = d_BxT.sum()
    tokens = int(mask_BxT.sum())
    at_markers = {}
    for category, (rollout_N, position_N) in marker_picks.items():
        values_N = d_BxT[rollout_N, position_N]
        at_markers[category] = ({"positions": int(values_N.size),
                                 **_mean_over_positions(values_N, rollout_N, seed, problems_B)}
                                if values_N.size else {"positions": 0})
    fork_share_of_tokens = float(fork_BxT.sum() / tokens) if tokens else None
    # A teacher that is the student in the same context leaves float32 residue (~1e-15 per token):
    # where it is shared out does not mean anything.
    share_at_forks = float((d_BxT * fork_BxT).sum() / total) if total > NO_DIVERGENCE_PER_TOKEN * tokens else None
    return {
        "all": pooled(mask_BxT), "at_forks": pooled(fork_BxT), "off_forks": pooled(mask_BxT & ~fork_BxT),
        "share_at_forks": share_at_forks, "fork_share_of_tokens": fork_share_of_tokens,
        "concentration_at_forks": (share_at_forks / fork_share_of_tokens
                                   if share_at_forks is not None and fork_share_of_tokens else None),
        "at_markers": at_markers,
    }
