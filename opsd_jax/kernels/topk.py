"""Top-k divergence: the teacher's k most likely tokens plus one tail bucket for the rest.

Letters: N tokens, V vocabulary, K kept teacher tokens. Both distributions are coarsened to the
same K + 1 outcomes (the K teacher tokens, then "anything else"), so the divergence is a proper
one between two distributions and a teacher served over an API (top-k log-probs only) suffices.
The student still normalizes over the full vocabulary; gradients reach the student logits only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from opsd_jax.kernels import api, rows


class TopKOutput(NamedTuple):
    """divergence: float32 [N] over the K + 1 buckets (zero for ignored tokens);
    student_logprobs: float32 [N, K] at the teacher's ids; student_tail / teacher_tail: float32 [N]
    log-mass outside the K ids (at least log TAIL_FLOOR)."""

    divergence: jax.Array
    student_logprobs: jax.Array
    student_tail: jax.Array
    teacher_tail: jax.Array


def teacher_topk(teacher_logits, k: int, *, temperature: float = 1.0, valid_vocab: int | None = None):
    """(ids int32 [N, K], log-probs float32 [N, K]) of the teacher's k most likely tokens.

    teacher_logits: float [N, V]; padded vocabulary entries (>= valid_vocab) are never picked.
    """
    _, temperature = api._check_scalars(0.0, temperature)
    api._check_matrix("teacher_logits", teacher_logits)
    vocab = teacher_logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= (valid_vocab or vocab):
        raise ValueError(f"k must be an int in [1, {valid_vocab or vocab}] (valid vocabulary), got {k!r}")
    z_NxV = rows.scaled_logits(teacher_logits, temperature, valid_vocab)
    logprobs_NxV = jax.nn.log_softmax(z_NxV, axis=-1)
    values_NxK, ids_NxK = jax.lax.top_k(logprobs_NxV, k)
    return ids_NxK.astype(jnp.int32), values_NxK


# Smallest tail mass. Summing K float32 probabilities leaves rounding error of about K * 2^-24,
# so a tail that should be empty can come out as 1e-7 on one side and exactly 0 on the other;
# the floor keeps that from turning into an infinite KL.
TAIL_FLOOR = 1e-9


def _rest(logprobs_NxK):
    """1 - sum exp(logprobs) per row, float32 [N] (unfloored; may round to <= 0)."""
    lse_N = jax.nn.logsumexp(logprobs_NxK, axis=-1)
    return -jnp.expm1(jnp.minimum(lse_N, 0.0))


def _log_rest(rest_N):
    """log(max(rest, TAIL_FLOOR)): the tail bucket's log-mass, float32 [N]."""
    return jnp.log(jnp.maximum(rest_N, TAIL_FLOOR))


# The divergence of nearly equal distributions (1e-9 .. 1e-7 here) is far below the float32
# rounding of log-probabilities of size ~10, so neither log p_t - log p_s per bucket nor a sum of
# p log(p / q) terms that cancel to first order can carry it. Instead:
# - the per-bucket gap d = log p_t - log p_s is formed from (log p_t - z_s) + log Z_s with the
#   first difference kept exactly as a float32 pair (TwoSum), so only log Z_s's own rounding
#   remains, a common shift whose effect on the divergence is second order;
# - the tail's gap is log1p((S_s - S_t) / rest_s) with S_s - S_t = sum p_t expm1(-d) term by term;
# - every KL is written as sum p (expm1(r) - r), r = log(q / p), whose terms are each >= 0 and
#   second order in r (the generalized KL, equal to the KL because both sides sum to 1).


def _two_sum(a, b):
    """(hi, lo), float32, with hi + lo == a + b exactly (Knuth's TwoSum; XLA does not reassociate)."""
    hi = a + b
    b_part = hi - a
    return hi, (a - (hi - b_part)) + (b - b_part)


def _kl_terms(p, log_q_over_p):
    """KL(p || q) summed over the last axis as sum p (expm1(r) - r), r = log(q / p); 0 where p == 0."""
    return jnp.sum(rows.xlogy_safe(p, rows.expm1_minus_identity(log_q_over_p)), axis=-1)


def _bucket_gaps(zs_NxK, log_zs_N, lt_NxK, ps_NxK, pt_NxK, rest_s_N, rest_t_N):
    """d = log p_t - log p_s over the K + 1 buckets, float32 [N, K + 1], without cancellation.

    zs_NxK: the student's scaled logits at the teacher's ids; log_zs_N: their log-normalizer.
    Rows whose tails are at the floor or far apart keep the plain difference of the log-masses.
    """
    hi_NxK, lo_NxK = _two_sum(lt_NxK, -zs_NxK)
    d_NxK = (hi_NxK + log_zs_N[:, None]) + jax.lax.stop_gradient(lo_NxK)
    excess_N = jnp.sum(rows.mass_differences(-d_NxK, ps_NxK, pt_NxK), axis=-1)  # S_s - S_t
    # rest_t = rest_s + excess. Both rests carry ~K * 2^-24 of rounding, so a tail that is mostly
    # rounding can give a ratio below -1; where the tails differ by half or more, or either is at
    # the floor, the plain difference of the log-masses has no cancellation to avoid.
    ratio_N = excess_N / jnp.where(rest_s_N > TAIL_FLOOR, rest_s_N, 1.0)
    precise_N = (rest_s_N > TAIL_FLOOR) & (rest_t_N > TAIL_FLOOR) & (jnp.abs(ratio_N) < 0.5)
    d_tail_N = jnp.where(precise_N, jnp.log1p(jnp.where(precise_N, ratio_N, 0.0)),
                         _log_rest(rest_t_N) - _log_rest(rest_s_N))
    return jnp.concatenate([d_NxK, d_tail_N[:, None]], axis=-1)


def topk_divergence(
    student_logits,
    teacher_ids,
    teacher_logprobs,
    *,
    beta: float,
    temperature: float = 1.0,
    mask=None,
    valid_vocab: int | None = None,
) -> TopKOutput:
    """Divergence between student and teacher restricted to the teacher's top-k plus a tail bucket.

    student_logits: float [N, V]; teacher_ids: int [N, K]; teacher_logprobs: float [N, K], the
    teacher's log-probabilities of those ids at the same temperature (e.g. from teacher_topk).
    beta, temperature, mask, valid_vocab: as in `divergence`.
    """
    beta, temperature = api._check_scalars(beta, temperature)
    api._check_matrix("student_logits", student_logits)
    api._check_matrix("teacher_logprobs", teacher_logprobs)
    n, vocab = student_logits.shape
    if not hasattr(teacher_ids, "shape") or teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            f"teacher_ids {getattr(teacher_ids, 'shape', None)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must have the same [tokens, k] shape"
        )
    if not jnp.issubdtype(teacher_ids.dtype, jnp.integer):
        raise TypeError(f"teacher_ids must be integer token ids, got {teacher_ids.dtype}")
    if teacher_ids.shape[0] != n:
        raise ValueError(f"teacher_ids has {teacher_ids.shape[0]} tokens but student_logits has {n}")
    if teacher_ids.shape[1] > vocab:
        raise ValueError(f"teacher_ids keeps {teacher_ids.shape[1]} tokens, more than the vocabulary {vocab}")
    mask_N, valid_vocab, _ = api._check_token_args(n, vocab, mask, valid_vocab, None)

    zs_NxV = rows.scaled_logits(student_logits, temperature, valid_vocab)
    log_zs_N = jax.nn.logsumexp(zs_NxV, axis=-1)
    zs_NxK = jnp.take_along_axis(zs_NxV, teacher_ids.astype(jnp.int32), axis=-1)
    ls_NxK = zs_NxK - log_zs_N[:, None]
    lt_NxK = jax.lax.stop_gradient(teacher_logprobs.astype(jnp.float32))
    rest_s_N, rest_t_N = _rest(ls_NxK), _rest(lt_NxK)
    tail_s_N, tail_t_N = _log_rest(rest_s_N), _log_rest(rest_t_N)
    # K + 1 outcomes: the teacher's ids, then the tail bucket.
    ls_NxB = jnp.concatenate([ls_NxK, tail_s_N[:, None]], axis=-1)
    lt_NxB = jnp.concatenate([lt_NxK, tail_t_N[:, None]], axis=-1)
    ps_NxB, pt_NxB = jnp.exp(ls_NxB), jnp.exp(lt_NxB)
    d_NxB = _bucket_gaps(zs_NxK, log_zs_N, lt_NxK, ps_NxB[:, :-1], pt_NxB[:, :-1], rest_s_N, rest_t_N)
    mode = rows.divergence_mode(beta)
    if mode == "forward":
        div_N = _kl_terms(pt_NxB, -d_NxB)
    elif mode == "reverse":
        div_N = _kl_terms(ps_NxB, d_NxB)
    else:
        log_m_over_ps_NxB, log_m_over_pt_NxB = rows.log_mixture_ratios_from_w(d_NxB, beta)
        div_N = beta * _kl_terms(pt_NxB, log_m_over_pt_NxB) + (1.0 - beta) * _kl_terms(ps_NxB, log_m_over_ps_NxB)
    keep = lambda x: jnp.where(mask_N.reshape(mask_N.shape + (1,) * (x.ndim - 1)), x, 0.0)  # noqa: E731
    return TopKOutput(keep(div_N), keep(ls_NxK), keep(tail_s_N), keep(tail_t_N))
