"""Fork rates: the share of rollout positions whose next-token entropy is high, i.e. where several
continuations stay plausible (Wang et al. 2025: ~80% of Qwen3-8B reasoning tokens fall below
0.672 nats). Pure NumPy on per-token entropies, so the statistics are testable on arrays with
known answers.

Letters: B rollouts, T completion positions.
"""

from __future__ import annotations

import numpy as np

from opsd_jax.analysis.stats import ratio_ci
from opsd_jax.eval.grader import THINK_CLOSE, THINK_OPEN

DEFAULT_THRESHOLD_NATS = 0.672
SPANS = ("all", "thinking", "answer")


def fork_threshold(entropy_BxT: np.ndarray, mask_BxT: np.ndarray, *, threshold: float | None = DEFAULT_THRESHOLD_NATS,
                   top_rho: float | None = None) -> float:
    """The entropy above which a position counts as a fork.

    entropy_BxT: float[B, T] nats; mask_BxT: bool[B, T] real completion tokens.
    top_rho set: the (1 - top_rho) quantile of the masked entropies (so about a top_rho share of
    the batch are forks); otherwise the absolute `threshold`.
    """
    if top_rho is None:
        if threshold is None or not np.isfinite(threshold):
            raise ValueError(f"fork threshold must be a finite number of nats, got {threshold}")
        return float(threshold)
    if not 0.0 < top_rho <= 1.0:
        raise ValueError(f"top_rho must lie in (0, 1], got {top_rho}")
    values = np.asarray(entropy_BxT, np.float64)[np.asarray(mask_BxT, bool)]
    if values.size == 0:
        raise ValueError("no completion tokens to take an entropy quantile of")
    # "lower": the threshold is an observed entropy, and positions strictly above it are forks.
    return float(np.quantile(values, 1.0 - top_rho, method="lower"))


def thinking_mask(text: str, char_end_T: np.ndarray, prompt_opens_thinking: bool) -> np.ndarray:
    """bool[T]: True for the thinking span of one rollout, up to and including the token that
    completes its first `</think>`.

    text / char_end_T: the rollout decoded and where each token's characters end
    (markers.token_pieces). The tags are found in the text, not as token ids: OLMo-3's tokenizer
    has no `<think>` / `</think>` tokens and spells them over several. Without a `</think>` the
    rollout is all thinking when a think block is open (the prompt opened one, or the rollout
    did: truncated mid-thought) and all answer otherwise (a model that did not think).
    """
    char_end_T = np.asarray(char_end_T)
    close = text.find(THINK_CLOSE)
    if close >= 0:
        last = int(np.searchsorted(char_end_T, close + len(THINK_CLOSE), side="left"))
        mask_T = np.zeros(char_end_T.shape, bool)
        mask_T[: last + 1] = True
        return mask_T
    return np.full(char_end_T.shape, prompt_opens_thinking or THINK_OPEN in text, bool)


def is_fork(entropy_BxT: np.ndarray, threshold_nats: float) -> np.ndarray:
    """bool [B, T]: positions whose entropy is above the threshold."""
    return np.asarray(entropy_BxT, np.float64) > threshold_nats


def fork_rates(entropy_BxT: np.ndarray, mask_BxT: np.ndarray, thinking_BxT: np.ndarray, threshold_nats: float,
               *, seed: int = 0, problems_B=None) -> dict:
    """{span: {"fork_rate", "forks", "tokens", "fork_rate_ci95"}} for spans all / thinking / answer.

    entropy_BxT: float[B, T]; mask_BxT: bool[B, T] real tokens; thinking_BxT: bool[B, T] thinking
    span. fork_rate is forks / tokens pooled over rollouts (None for an empty span); the CI
    resamples problems (problems_B: each rollout's problem id; None: rollouts).
    """
    mask_BxT = np.asarray(mask_BxT, bool)
    thinking_BxT = np.asarray(thinking_BxT, bool)
    fork_BxT = is_fork(entropy_BxT, threshold_nats)
    out = {}
    for span, span_BxT in (("all", mask_BxT), ("thinking", mask_BxT & thinking_BxT),
                           ("answer", mask_BxT & ~thinking_BxT)):
        tokens = int(span_BxT.sum())
        forks = int((fork_BxT & span_BxT).sum())
        out[span] = {"fork_rate": forks / tokens if tokens else None, "forks": forks, "tokens": tokens,
                     "fork_rate_ci95": list(ratio_ci((fork_BxT & span_BxT).sum(1), span_BxT.sum(1),
                                                          clusters_B=problems_B, seed=seed))}
    return out
