"""Distillation objectives on aligned completion positions.

Shape letters: B sequences, T completion positions (padded), N = B * T.
Every function is pure; the train step composes them around the fused divergence kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def completion_mask(lengths_B, length: int, *, skip_first: int = 0, window: int | None = None,
                    window_from: str = "first"):
    """bool[B, T]: completion positions that carry loss.

    Positions past a sequence's length are padding; the first `skip_first` are excluded; with a
    window only the first (or last) `window` completion tokens count.
    """
    t_T = jnp.arange(length)[None, :]
    lengths_Bx1 = jnp.asarray(lengths_B)[:, None]
    mask_BxT = (t_T < lengths_Bx1) & (t_T >= skip_first)
    if window is not None:
        if window_from == "first":
            mask_BxT &= t_T < window
        elif window_from == "last":
            mask_BxT &= t_T >= lengths_Bx1 - window
        else:
            raise ValueError(f"window_from must be 'first' or 'last', got {window_from!r}")
    return mask_BxT


def _masked_quantile(values_BxT, mask_BxT, q: float):
    return jnp.nanquantile(jnp.where(mask_BxT, values_BxT, jnp.nan), q)


def fork_positions(mask_BxT, student_entropy_BxT, top_rho: float):
    """bool[B, T]: the loss tokens among the top-rho share by student entropy (stop-gradient):
    the "forking" tokens, ties at the threshold included."""
    entropy = jax.lax.stop_gradient(student_entropy_BxT)
    return (entropy >= _masked_quantile(entropy, mask_BxT, 1.0 - top_rho)) & mask_BxT


def token_weights(mask_BxT, student_entropy_BxT, kind: str = "none", *, top_rho: float = 0.2,
                  fork_weight: float = 0.5):
    """float32[B, T] per-token loss weights (stop-gradient), a pluggable function of entropies.

    none: the mask. top_student_entropy: only the top-rho share of loss tokens by student entropy
    (the "forking" tokens). downweight_teacher_at_forks: `fork_weight` at those tokens, 1 elsewhere.
    """
    mask = mask_BxT.astype(jnp.float32)
    if kind == "none":
        return mask
    forks_BxT = fork_positions(mask_BxT, student_entropy_BxT, top_rho)
    if kind == "top_student_entropy":
        return forks_BxT.astype(jnp.float32)
    if kind == "downweight_teacher_at_forks":
        return mask * jnp.where(forks_BxT, fork_weight, 1.0)
    raise ValueError(f"unknown token weighting {kind!r}")


def sequence_importance(student_logprob_BxT, sampler_logprob_BxT, mask_BxT, cap: float | None,
                        clamp: str = "sequence"):
    """float32[B] stop-gradient: one importance weight per sequence from the per-token ratios
    r_t = exp(logp_train - logp_sampler) over its loss tokens (0 for a sequence without any).

    clamp="token": mean_t min(r_t, cap), the paper's form (each ratio capped, then averaged).
    clamp="sequence": min(mean_t r_t, cap).
    It corrects for the sampler's distribution (after top-k / top-p when the sampler's processed
    log-probs are given, numerics and stale weights always) differing from the one being trained.
    """
    if clamp not in ("token", "sequence"):
        raise ValueError(f"clamp must be 'token' or 'sequence', got {clamp!r}")
    log_ratio = jax.lax.stop_gradient(student_logprob_BxT) - sampler_logprob_BxT
    ratio_BxT = jnp.exp(jnp.where(mask_BxT, log_ratio, 0.0))
    if clamp == "token" and cap is not None:
        ratio_BxT = jnp.minimum(ratio_BxT, cap)
    count_B = jnp.maximum(mask_BxT.sum(-1), 1)
    ratio_B = jnp.where(mask_BxT, ratio_BxT, 0.0).sum(-1) / count_B
    return ratio_B if clamp == "token" or cap is None else jnp.minimum(ratio_B, cap)


def discounted_returns(advantage_BxT, mask_BxT, discount: float):
    """R_t = sum_{u >= t} discount^(u - t) a_u over loss positions (discount 1: sum to the end;
    0: the token's own advantage)."""
    if discount == 0.0:
        return jnp.where(mask_BxT, advantage_BxT, 0.0)

    def step(carry_B, inputs):
        advantage_B, mask_B = inputs
        carry_B = jnp.where(mask_B, advantage_B + discount * carry_B, discount * carry_B)
        return carry_B, carry_B

    _, returns_TxB = jax.lax.scan(
        step, jnp.zeros(advantage_BxT.shape[0]), (advantage_BxT.T, mask_BxT.T), reverse=True
    )
    return jnp.where(mask_BxT, returns_TxB.T, 0.0)


def sampled_reverse_kl_loss(student_logprob_BxT, teacher_logprob_BxT, sampler_logprob_BxT, mask_BxT, *,
                            discount: float = 0.0, ratio_cap: float | None = None):
    """Per-token loss whose gradient is the sampled-token reverse-KL policy gradient.

    advantage a_t = stop_grad(log p_T(y_t) - log p_S(y_t)); with importance ratio
    r_t = exp(log p_S(y_t) - log p_sampler(y_t)), loss_t = -r_t * R_t where R_t discounts the
    advantages of this and later tokens. d loss_t / d theta = -R_t r_t grad log p_S(y_t), the
    policy gradient of E[log p_S - log p_T] evaluated on the sampler's tokens.
    """
    advantage = jax.lax.stop_gradient(teacher_logprob_BxT - student_logprob_BxT)
    returns = discounted_returns(advantage, mask_BxT, discount)
    log_ratio = student_logprob_BxT - jax.lax.stop_gradient(sampler_logprob_BxT)
    ratio = jnp.exp(jnp.where(mask_BxT, log_ratio, 0.0))
    if ratio_cap is not None:
        ratio = jnp.minimum(ratio, ratio_cap)
    return jnp.where(mask_BxT, -ratio * returns, 0.0)


def reduce_loss(per_token_BxT, weights_BxT, mask_BxT, sequence_scale_B, reduction: str):
    """Scalar loss. sequence_mean: each sequence's weighted token mean (over its loss tokens),
    times its scale, averaged over all B sequences; one without loss tokens (a completion no
    longer than `skip_first`) adds 0 and still counts, as in the paper's trainer, so the mean of
    equal microbatches' losses is the whole batch's loss. token_mean: weighted sum over all loss
    tokens of the batch divided by their count."""
    weighted_BxT = jnp.where(mask_BxT, per_token_BxT * weights_BxT, 0.0)
    count_B = mask_BxT.sum(-1)
    if reduction == "sequence_mean":
        return (weighted_BxT.sum(-1) / jnp.maximum(count_B, 1) * sequence_scale_B).mean()
    if reduction == "token_mean":
        return (weighted_BxT * sequence_scale_B[:, None]).sum() / jnp.maximum(count_B.sum(), 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def loss_weights(weights_BxT, mask_BxT, sequence_scale_B, reduction: str):
    """float32[B, T]: d reduce_loss / d per_token, the cotangent each token's loss receives.

    reduce_loss is linear in per_token, so this is its gradient anywhere (taken at zero, through
    the same operations the loss's own backward runs, so the two agree to the last bit or
    nearly). The fused divergence kernel takes it as its `weights` to form the final gradients
    in its forward sweep.
    """
    def reduced(per_token_BxT):
        return reduce_loss(per_token_BxT, weights_BxT, mask_BxT, sequence_scale_B, reduction)

    return jax.grad(reduced)(jnp.zeros(mask_BxT.shape, jnp.float32))
