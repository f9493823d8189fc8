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


def _log_rest(logprobs_NxK):
    """log(max(1 - sum exp(logprobs), TAIL_FLOOR)) per row: float32 [N]."""
    lse_N = jax.nn.logsumexp(logprobs_NxK, axis=-1)
    rest_N = -jnp.expm1(jnp.minimum(lse_N, 0.0))
    return jnp.log(jnp.maximum(rest_N, TAIL_FLOOR))


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
    ls_NxV = jax.nn.log_softmax(zs_NxV, axis=-1)
    ls_NxK = jnp.take_along_axis(ls_NxV, teacher_ids.astype(jnp.int32), axis=-1)
    lt_NxK = jax.lax.stop_gradient(teacher_logprobs.astype(jnp.float32))
    tail_s_N = _log_rest(ls_NxK)
    tail_t_N = _log_rest(lt_NxK)
    # K + 1 outcomes: the teacher's ids, then the tail bucket.
    ls_NxB = jnp.concatenate([ls_NxK, tail_s_N[:, None]], axis=-1)
    lt_NxB = jnp.concatenate([lt_NxK, tail_t_N[:, None]], axis=-1)
    ps_NxB, pt_NxB = jnp.exp(ls_NxB), jnp.exp(lt_NxB)
    mode = rows.divergence_mode(beta)
    if mode == "forward":
        div_N = jnp.sum(rows.xlogy_safe(pt_NxB, lt_NxB - ls_NxB), axis=-1)
    elif mode == "reverse":
        div_N = jnp.sum(rows.xlogy_safe(ps_NxB, ls_NxB - lt_NxB), axis=-1)
    else:
        lm_NxB = rows.log_mixture(ls_NxB, lt_NxB, beta)
        div_N = beta * jnp.sum(rows.xlogy_safe(pt_NxB, lt_NxB - lm_NxB), axis=-1) + (1.0 - beta) * jnp.sum(
            rows.xlogy_safe(ps_NxB, ls_NxB - lm_NxB), axis=-1
        )
    keep = lambda x: jnp.where(mask_N.reshape(mask_N.shape + (1,) * (x.ndim - 1)), x, 0.0)  # noqa: E731
    return TopKOutput(keep(div_N), keep(ls_NxK), keep(tail_s_N), keep(tail_t_N))
