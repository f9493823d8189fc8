"""The readable definition: whole [N, V] float32 arrays and plain autodiff.

Letters: N tokens, V vocabulary, Hs / Ht hidden widths. Memory is O(N * V); use it to check the
other implementations, not to train. Its KLs are sums of log p - log q in float32, so divergences
below ~1e-6 at a large vocabulary are rounding, not signal; `xla` and the kernels keep those digits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opsd_jax.kernels import rows
from opsd_jax.kernels.spec import DivergenceOutput, DivergenceSpec


def divergence(student_logits_NxV, teacher_logits_NxV, mask_N, targets_N, spec: DivergenceSpec):
    """DivergenceOutput (float32 [N] each) from float [N, V] logits; see api.divergence."""
    zs_NxV = rows.scaled_logits(student_logits_NxV, spec.temperature, spec.valid_vocab)
    # The teacher is a fixed target: no gradient reaches it.
    zt_NxV = jax.lax.stop_gradient(
        rows.scaled_logits(teacher_logits_NxV, spec.temperature, spec.valid_vocab)
    )
    ls_NxV = jax.nn.log_softmax(zs_NxV, axis=-1)
    lt_NxV = jax.nn.log_softmax(zt_NxV, axis=-1)
    ps_NxV = jnp.exp(ls_NxV)
    pt_NxV = jnp.exp(lt_NxV)
    beta = spec.beta
    if beta == 0.0:
        div_N = jnp.sum(rows.xlogy_safe(pt_NxV, lt_NxV - ls_NxV), axis=-1)
    elif beta == 1.0:
        div_N = jnp.sum(rows.xlogy_safe(ps_NxV, ls_NxV - lt_NxV), axis=-1)
    else:
        lm_NxV = rows.log_mixture(ls_NxV, lt_NxV, beta)
        div_N = beta * jnp.sum(rows.xlogy_safe(pt_NxV, lt_NxV - lm_NxV), axis=-1) + (
            1.0 - beta
        ) * jnp.sum(rows.xlogy_safe(ps_NxV, ls_NxV - lm_NxV), axis=-1)
    ent_s_N = -jnp.sum(rows.xlogy_safe(ps_NxV, ls_NxV), axis=-1)
    ent_t_N = -jnp.sum(rows.xlogy_safe(pt_NxV, lt_NxV), axis=-1)

    def keep(x_N):
        return jnp.where(mask_N, x_N, 0.0)

    lp_s_N = lp_t_N = None
    if targets_N is not None:
        lp_s_N = keep(jnp.take_along_axis(ls_NxV, targets_N[:, None], axis=-1)[:, 0])
        lp_t_N = keep(jnp.take_along_axis(lt_NxV, targets_N[:, None], axis=-1)[:, 0])
    return DivergenceOutput(keep(div_N), keep(ent_s_N), keep(ent_t_N), lp_s_N, lp_t_N)


def fused_linear_divergence(
    student_hidden_NxHs, student_head_HsxV, teacher_hidden_NxHt, teacher_head_HtxV, mask_N, targets_N, weights_N, spec
):
    """The same outputs from hidden states and heads, by forming both logits in float32 (autodiff
    needs no `weights`)."""
    logits_s_NxV = jnp.dot(student_hidden_NxHs, student_head_HsxV, preferred_element_type=jnp.float32)
    logits_t_NxV = jnp.dot(teacher_hidden_NxHt, teacher_head_HtxV, preferred_element_type=jnp.float32)
    return divergence(logits_s_NxV, logits_t_NxV, mask_N, targets_N, spec)
