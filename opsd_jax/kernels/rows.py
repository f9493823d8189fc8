"""Row math shared by every divergence implementation: plain jnp on float32 tiles.

Letters: R rows (tokens in a tile), C columns (vocabulary entries in a tile), V full vocabulary.

Every function here works on values, not refs, so the XLA path calls it on `[R, V]` rows or
`[R, C]` vocabulary blocks and the Pallas kernels call it on the blocks they loaded. Excluded
vocabulary entries (padding rows of the embedding, user -inf logits, columns a block revisits)
are carried as -inf logits; every product with a probability is guarded so that 0 * -inf
contributes 0 instead of NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def divergence_mode(beta: float) -> str:
    """'forward' (beta=0), 'reverse' (beta=1) or 'jsd' (in between): the endpoints are KLs, not JSD limits."""
    if beta == 0.0:
        return "forward"
    if beta == 1.0:
        return "reverse"
    return "jsd"


def columns(width: int, column_start=0):
    """Vocabulary indices of a block's columns, int32 [1, C] (2-D: Mosaic wants 2-D iotas)."""
    return column_start + jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)


def scaled_logits(logits_RxC, temperature: float, valid_vocab: int | None, column_start=0):
    """float32 logits / temperature with columns at or past `valid_vocab` set to -inf.

    logits_RxC: any float dtype [R, C]; column_start: the vocabulary index of column 0 (int or
    traced int32), so blocks of a wider vocabulary know which of their columns are padding.
    """
    z_RxC = logits_RxC.astype(jnp.float32)
    if temperature != 1.0:
        z_RxC = z_RxC * (1.0 / temperature)
    if valid_vocab is not None:
        z_RxC = jnp.where(columns(z_RxC.shape[-1], column_start) < valid_vocab, z_RxC, NEG_INF)
    return z_RxC


def safe_max(z_RxC):
    """Row max, with 0 for rows that are all -inf, so exp(z - max) is 0 there rather than NaN."""
    m_R = jnp.max(z_RxC, axis=-1)
    return jnp.where(jnp.isfinite(m_R), m_R, 0.0)


def xlogy_safe(p, x):
    """p * x with 0 wherever p == 0 (x may be -inf or NaN there)."""
    return jnp.where(p > 0, p * jnp.where(p > 0, x, 0.0), 0.0)


def log_mixture(ls_RxC, lt_RxC, beta: float):
    """log(beta * p_teacher + (1 - beta) * p_student) from the two log-probabilities.

    Entries excluded from both distributions stay -inf; the inner where keeps their NaN
    derivative (logaddexp at two -infs) out of autodiff.
    """
    a_RxC = ls_RxC + math.log1p(-beta)
    b_RxC = lt_RxC + math.log(beta)
    hi_RxC = jnp.maximum(a_RxC, b_RxC)
    empty_RxC = hi_RxC == NEG_INF
    safe_hi_RxC = jnp.where(empty_RxC, 0.0, hi_RxC)
    total_RxC = jnp.exp(a_RxC - safe_hi_RxC) + jnp.exp(b_RxC - safe_hi_RxC)
    log_total_RxC = jnp.log(jnp.where(empty_RxC, 1.0, total_RxC))
    return jnp.where(empty_RxC, NEG_INF, safe_hi_RxC + log_total_RxC)


class RowStats(NamedTuple):
    """Per-token results for full rows; `aux` is what the gradient needs besides the normalizers:
    the divergence itself for the reverse KL and KL(p_student || mixture) for the JSD."""

    divergence_R: jnp.ndarray
    student_entropy_R: jnp.ndarray
    teacher_entropy_R: jnp.ndarray
    student_log_z_R: jnp.ndarray
    teacher_log_z_R: jnp.ndarray
    aux_R: jnp.ndarray


def full_row_stats(zs_RxV, zt_RxV, beta: float) -> RowStats:
    """All per-token quantities from complete rows of scaled logits (float32 [R, V], -inf = excluded)."""
    mode = divergence_mode(beta)
    log_zs_R = _log_normalizer(zs_RxV)
    log_zt_R = _log_normalizer(zt_RxV)
    ls_RxV = zs_RxV - log_zs_R[:, None]
    lt_RxV = zt_RxV - log_zt_R[:, None]
    ps_RxV = jnp.exp(ls_RxV)
    pt_RxV = jnp.exp(lt_RxV)
    ent_s_R = -jnp.sum(xlogy_safe(ps_RxV, ls_RxV), axis=-1)
    ent_t_R = -jnp.sum(xlogy_safe(pt_RxV, lt_RxV), axis=-1)
    if mode == "forward":
        div_R = jnp.sum(xlogy_safe(pt_RxV, lt_RxV - ls_RxV), axis=-1)
        aux_R = div_R
    elif mode == "reverse":
        div_R = jnp.sum(xlogy_safe(ps_RxV, ls_RxV - lt_RxV), axis=-1)
        aux_R = div_R
    else:
        lm_RxV = log_mixture(ls_RxV, lt_RxV, beta)
        kl_s_R = jnp.sum(xlogy_safe(ps_RxV, ls_RxV - lm_RxV), axis=-1)
        kl_t_R = jnp.sum(xlogy_safe(pt_RxV, lt_RxV - lm_RxV), axis=-1)
        div_R = beta * kl_t_R + (1.0 - beta) * kl_s_R
        aux_R = kl_s_R
    return RowStats(div_R, ent_s_R, ent_t_R, log_zs_R, log_zt_R, aux_R)


def _log_normalizer(z_RxV):
    m_R = safe_max(z_RxV)
    return m_R + jnp.log(jnp.sum(jnp.exp(z_RxV - m_R[:, None]), axis=-1))


def student_grad_tile(
    zs_RxC,
    zt_RxC,
    log_zs_R,
    log_zt_R,
    aux_R,
    student_entropy_R,
    beta: float,
    cot_divergence_R,
    cot_entropy_R=None,
    cot_logprob_R=None,
    target_column_R=None,
    column_start=0,
):
    """Gradient of sum_r (cot_divergence * D + cot_entropy * H_student + cot_logprob * log p_s[target])
    with respect to the scaled student logits z of one tile: float32 [R, C].

    The cotangents are float32 [R] (zero for ignored tokens); target_column_R holds vocabulary
    indices. The caller divides by the temperature to get the gradient of the raw logits.
    """
    mode = divergence_mode(beta)
    ls_RxC = zs_RxC - log_zs_R[:, None]
    ps_RxC = jnp.exp(ls_RxC)
    if mode == "forward":
        pt_RxC = jnp.exp(zt_RxC - log_zt_R[:, None])
        d_RxC = ps_RxC - pt_RxC
    elif mode == "reverse":
        lt_RxC = zt_RxC - log_zt_R[:, None]
        d_RxC = xlogy_safe(ps_RxC, ls_RxC - lt_RxC - aux_R[:, None])
    else:
        lt_RxC = zt_RxC - log_zt_R[:, None]
        lm_RxC = log_mixture(ls_RxC, lt_RxC, beta)
        d_RxC = (1.0 - beta) * xlogy_safe(ps_RxC, ls_RxC - lm_RxC - aux_R[:, None])
    g_RxC = cot_divergence_R[:, None] * d_RxC
    if cot_entropy_R is not None:
        # dH/dz_j = -p_j (log p_j + H)
        g_RxC = g_RxC - cot_entropy_R[:, None] * xlogy_safe(
            ps_RxC, ls_RxC + student_entropy_R[:, None]
        )
    if cot_logprob_R is not None:
        # d log p_y / dz_j = [j == y] - p_j
        hit_RxC = columns(zs_RxC.shape[-1], column_start) == target_column_R[:, None]
        g_RxC = g_RxC + cot_logprob_R[:, None] * (hit_RxC.astype(jnp.float32) - ps_RxC)
    return g_RxC


def target_logit(z_RxC, target_column_R, column_start=0):
    """z[r, target_r] for targets that fall in this block, 0 elsewhere: float32 [R]."""
    hit_RxC = columns(z_RxC.shape[-1], column_start) == target_column_R[:, None]
    return jnp.sum(jnp.where(hit_RxC, z_RxC, 0.0), axis=-1)


class OnlineStats(NamedTuple):
    """Running statistics of one row over vocabulary blocks (all float32 [R]).

    Sums are relative to the running max m: s = sum e^(z - m), b = sum e^(z - m) (z - m),
    and the cross terms sum e^(z_t - m_t) (z_t - z_s) (teacher) and sum e^(z_s - m_s) (z_s - z_t)
    (student) that give the two KLs without a second pass.
    """

    student_max: jnp.ndarray
    student_sum: jnp.ndarray
    student_centered: jnp.ndarray
    student_gap: jnp.ndarray
    teacher_max: jnp.ndarray
    teacher_sum: jnp.ndarray
    teacher_centered: jnp.ndarray
    teacher_gap: jnp.ndarray


def online_init(rows: int) -> OnlineStats:
    zero_R = jnp.zeros((rows,), jnp.float32)
    minus_inf_R = jnp.full((rows,), NEG_INF, jnp.float32)
    return OnlineStats(minus_inf_R, zero_R, zero_R, zero_R, minus_inf_R, zero_R, zero_R, zero_R)


def _fold_one(m_R, s_R, b_R, gap_R, z_RxC, gap_RxC):
    new_m_R = jnp.maximum(m_R, jnp.max(z_RxC, axis=-1))
    safe_m_R = jnp.where(jnp.isfinite(new_m_R), new_m_R, 0.0)
    # exp(-inf - finite) = 0 drops the empty history; a still-empty row keeps its zeros.
    old_shift_R = jnp.where(jnp.isfinite(m_R), m_R - safe_m_R, 0.0)
    rescale_R = jnp.where(jnp.isfinite(m_R), jnp.exp(old_shift_R), 0.0)
    e_RxC = jnp.exp(z_RxC - safe_m_R[:, None])
    new_s_R = rescale_R * s_R + jnp.sum(e_RxC, axis=-1)
    # b is centered on m; moving the center by delta adds delta * s.
    new_b_R = rescale_R * (b_R + old_shift_R * s_R) + jnp.sum(
        xlogy_safe(e_RxC, z_RxC - safe_m_R[:, None]), axis=-1
    )
    new_gap_R = rescale_R * gap_R + jnp.sum(xlogy_safe(e_RxC, gap_RxC), axis=-1)
    return new_m_R, new_s_R, new_b_R, new_gap_R


def online_fold(stats: OnlineStats, zs_RxC, zt_RxC) -> OnlineStats:
    """Fold one vocabulary block of scaled logits (float32 [R, C], -inf = excluded) into the stats."""
    gap_RxC = zt_RxC - zs_RxC
    sm, ss, sb, sg = _fold_one(
        stats.student_max, stats.student_sum, stats.student_centered, stats.student_gap,
        zs_RxC, -gap_RxC,
    )
    tm, ts, tb, tg = _fold_one(
        stats.teacher_max, stats.teacher_sum, stats.teacher_centered, stats.teacher_gap,
        zt_RxC, gap_RxC,
    )
    return OnlineStats(sm, ss, sb, sg, tm, ts, tb, tg)


def online_log_normalizers(stats: OnlineStats):
    """(log Z_student, log Z_teacher), float32 [R] each, from folded stats."""
    safe_sm_R = jnp.where(jnp.isfinite(stats.student_max), stats.student_max, 0.0)
    safe_tm_R = jnp.where(jnp.isfinite(stats.teacher_max), stats.teacher_max, 0.0)
    return safe_sm_R + jnp.log(stats.student_sum), safe_tm_R + jnp.log(stats.teacher_sum)


def online_finish(stats: OnlineStats, beta: float, jsd_kl_s_R=None, jsd_kl_t_R=None) -> RowStats:
    """Per-token results from the folded stats; the JSD needs its two second-pass KLs passed in."""
    log_zs_R, log_zt_R = online_log_normalizers(stats)
    # H = log Z - E[z] = log s - E[z - m]
    ent_s_R = jnp.log(stats.student_sum) - stats.student_centered / stats.student_sum
    ent_t_R = jnp.log(stats.teacher_sum) - stats.teacher_centered / stats.teacher_sum
    mode = divergence_mode(beta)
    if mode == "forward":
        # KL(t||s) = E_t[z_t - z_s] - log Z_t + log Z_s
        div_R = stats.teacher_gap / stats.teacher_sum - log_zt_R + log_zs_R
        aux_R = div_R
    elif mode == "reverse":
        div_R = stats.student_gap / stats.student_sum - log_zs_R + log_zt_R
        aux_R = div_R
    else:
        div_R = beta * jsd_kl_t_R + (1.0 - beta) * jsd_kl_s_R
        aux_R = jsd_kl_s_R
    return RowStats(div_R, ent_s_R, ent_t_R, log_zs_R, log_zt_R, aux_R)


def jsd_block_kls(zs_RxC, zt_RxC, log_zs_R, log_zt_R, beta: float):
    """This block's share of KL(p_s || m) and KL(p_t || m), float32 [R] each (second JSD pass)."""
    ls_RxC = zs_RxC - log_zs_R[:, None]
    lt_RxC = zt_RxC - log_zt_R[:, None]
    lm_RxC = log_mixture(ls_RxC, lt_RxC, beta)
    kl_s_R = jnp.sum(xlogy_safe(jnp.exp(ls_RxC), ls_RxC - lm_RxC), axis=-1)
    kl_t_R = jnp.sum(xlogy_safe(jnp.exp(lt_RxC), lt_RxC - lm_RxC), axis=-1)
    return kl_s_R, kl_t_R


def online_partial(zs_RxC, zt_RxC) -> OnlineStats:
    """Stats of one vocabulary slice (float32 [R, C] scaled logits, -inf = excluded), ready for
    `online_combine` with the other slices of the same rows."""
    return online_fold(online_init(zs_RxC.shape[0]), zs_RxC, zt_RxC)


def online_combine(stats: OnlineStats, axis_name) -> OnlineStats:
    """Whole-row stats from each shard's stats of its vocabulary slice (float32 [R] each).

    Collectives over `axis_name` (a mesh axis or a tuple of them; () or None: nothing to combine):
    one pmax for the two maxima, then one psum of the six sums recentered on them. A shard whose
    slice holds no allowed column (m = -inf) contributes zeros.
    """
    if not axis_name:
        return stats
    m_s_R, m_t_R = jax.lax.pmax((stats.student_max, stats.teacher_max), axis_name)

    def recentered(m_R, new_m_R, s_R, b_R, gap_R):
        safe_m_R = jnp.where(jnp.isfinite(new_m_R), new_m_R, 0.0)
        shift_R = jnp.where(jnp.isfinite(m_R), m_R - safe_m_R, 0.0)
        rescale_R = jnp.where(jnp.isfinite(m_R), jnp.exp(shift_R), 0.0)
        return rescale_R * s_R, rescale_R * (b_R + shift_R * s_R), rescale_R * gap_R

    local = recentered(stats.student_max, m_s_R, stats.student_sum, stats.student_centered, stats.student_gap)
    local += recentered(stats.teacher_max, m_t_R, stats.teacher_sum, stats.teacher_centered, stats.teacher_gap)
    ss, sb, sg, ts, tb, tg = jax.lax.psum(local, axis_name)
    return OnlineStats(m_s_R, ss, sb, sg, m_t_R, ts, tb, tg)


def finish_row_stats(stats: OnlineStats, beta: float, jsd_kls=None) -> RowStats:
    """`online_finish` for whole-row stats; jsd_kls: (KL(p_s||m), KL(p_t||m)) float32 [R], only
    for the JSD (None otherwise)."""
    if divergence_mode(beta) == "jsd":
        return online_finish(stats, beta, *jsd_kls)
    return online_finish(stats, beta)
