"""custom_vjp wiring shared by the Pallas backends, and the output / cotangent masking every
statistics-first implementation (these and the vocabulary-parallel form) shares.

A backend supplies three functions of plain arrays (N tokens, V vocabulary, H hidden width):
  row_stats(inputs, targets_N, mask_N, spec) -> (rows.RowStats of float32 [N], target logits (s, t)
      or None); inputs = (student_logits, teacher_logits) or (hs, ws, ht, wt); token blocks
      without a kept row may be skipped (their rows' values are then meaningless)
  logits_grad(s, t, stats, cots, targets_N, spec) -> float [N, V] gradient of the student logits
  fused_grads(hs, ws, ht, wt, stats, cots, targets_N, spec) -> (float32 [N, Hs], float32 [Hs, V])
with cots = (divergence, student entropy, student log-prob or None) cotangents, float32 [N],
already zero for ignored tokens. Masking, target log-probs and dtype casts happen here once.

These are statistics-first kernels: a row's normalizers exist only after its statistics sweep,
so the student's gradient is one more sweep wherever it runs. It runs in the backward, with the
actual cotangents (any loss weighting at the same cost, and no [H, V] residual between forward
and backward); the `weights` argument of the fused form is accepted and not needed.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from opsd_jax.kernels import rows
from opsd_jax.kernels.spec import DivergenceOutput


class Backend(NamedTuple):
    row_stats: Callable
    logits_grad: Callable
    fused_grads: Callable


def outputs_from_stats(stats: rows.RowStats, target_logits, mask_N) -> DivergenceOutput:
    """DivergenceOutput (float32 [N]) from whole-row stats and the targets' scaled logits (s, t) or
    None; ignored tokens get exact zeros (`where`: their stats may be NaN)."""
    kept = lambda x_N: jnp.where(mask_N, x_N, 0.0)  # noqa: E731
    lp_s_N = lp_t_N = None
    if target_logits is not None:
        lp_s_N = kept(target_logits[0] - stats.student_log_z_R)
        lp_t_N = kept(target_logits[1] - stats.teacher_log_z_R)
    return DivergenceOutput(
        kept(stats.divergence_R), kept(stats.student_entropy_R), kept(stats.teacher_entropy_R), lp_s_N, lp_t_N
    )


def _outputs(backend: Backend, inputs, mask_N, targets_N, spec):
    stats, target_logits = backend.row_stats(inputs, targets_N, mask_N, spec)
    return outputs_from_stats(stats, target_logits, mask_N), stats


def cotangents(cot: DivergenceOutput, mask_N, targets_N):
    """(divergence, student entropy, student log-prob or None) cotangents, float32 [N], exactly
    zero for ignored tokens."""

    def kept(x_N):
        return None if x_N is None else jnp.where(mask_N, x_N.astype(jnp.float32), 0.0)

    return kept(cot.divergence), kept(cot.student_entropy), kept(cot.student_logprob) if targets_N is not None else None


def make(backend: Backend):
    """(divergence, fused_linear_divergence) implementation functions for the API."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def from_logits(s_NxV, t_NxV, mask_N, targets_N, spec):
        return _outputs(backend, (s_NxV, t_NxV), mask_N, targets_N, spec)[0]

    def from_logits_fwd(s_NxV, t_NxV, mask_N, targets_N, spec):
        out, stats = _outputs(backend, (s_NxV, t_NxV), mask_N, targets_N, spec)
        return out, (s_NxV, t_NxV, mask_N, targets_N, stats)

    def from_logits_bwd(spec, residuals, cot):
        s_NxV, t_NxV, mask_N, targets_N, stats = residuals
        cots = cotangents(cot, mask_N, targets_N)
        g_NxV = backend.logits_grad(s_NxV, t_NxV, stats, cots, targets_N, spec)
        return g_NxV.astype(s_NxV.dtype), None, None, None

    from_logits.defvjp(from_logits_fwd, from_logits_bwd)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def fused(hs, ws, ht, wt, mask_N, targets_N, spec):
        return _outputs(backend, (hs, ws, ht, wt), mask_N, targets_N, spec)[0]

    def fused_fwd(hs, ws, ht, wt, mask_N, targets_N, spec):
        out, stats = _outputs(backend, (hs, ws, ht, wt), mask_N, targets_N, spec)
        return out, (hs, ws, ht, wt, mask_N, targets_N, stats)

    def fused_bwd(spec, residuals, cot):
        hs, ws, ht, wt, mask_N, targets_N, stats = residuals
        cots = cotangents(cot, mask_N, targets_N)
        gh, gw = backend.fused_grads(hs, ws, ht, wt, stats, cots, targets_N, spec)
        return gh.astype(hs.dtype), gw.astype(ws.dtype), None, None, None, None

    fused.defvjp(fused_fwd, fused_bwd)

    def fused_linear_divergence(hs, ws, ht, wt, mask_N, targets_N, weights_N, spec):
        del weights_N  # the gradient sweep runs in the backward, with the actual cotangents
        return fused(hs, ws, ht, wt, mask_N, targets_N, spec)

    return from_logits, fused_linear_divergence


def full_cotangents(cots, n):
    """The three cotangent vectors with None replaced by zeros, float32 [N] each."""
    return tuple(jnp.zeros((n,), jnp.float32) if c is None else c for c in cots)
