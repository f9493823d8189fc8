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
    ms_R, mt_R = safe_max(zs_RxV), safe_max(zt_RxV)
    es_RxV = jnp.exp(zs_RxV - ms_R[:, None])
    et_RxV = jnp.exp(zt_RxV - mt_R[:, None])
    ss_R, ts_R = jnp.sum(es_RxV, axis=-1), jnp.sum(et_RxV, axis=-1)
    log_zs_R = ms_R + jnp.log(ss_R)
    log_zt_R = mt_R + jnp.log(ts_R)
    ls_RxV = zs_RxV - log_zs_R[:, None]
    lt_RxV = zt_RxV - log_zt_R[:, None]
    ps_RxV = es_RxV * (1.0 / ss_R)[:, None]
    pt_RxV = et_RxV * (1.0 / ts_R)[:, None]
    ent_s_R = -jnp.sum(xlogy_safe(ps_RxV, ls_RxV), axis=-1)
    ent_t_R = -jnp.sum(xlogy_safe(pt_RxV, lt_RxV), axis=-1)
    if mode == "forward":
        gap_R, excess_R = kl_block_sums(zt_RxV, zs_RxV, mt_R, ms_R, et_RxV, es_RxV)
        div_R = kl_from_sums(gap_R, excess_R, ts_R, ss_R)
        aux_R = div_R
    elif mode == "reverse":
        gap_R, excess_R = kl_block_sums(zs_RxV, zt_RxV, ms_R, mt_R, es_RxV, et_RxV)
        div_R = kl_from_sums(gap_R, excess_R, ss_R, ts_R)
        aux_R = div_R
    else:
        kl_s_R, kl_t_R = _jsd_kls(ps_RxV, pt_RxV, *log_mixture_ratios(zs_RxV, zt_RxV, log_zs_R, log_zt_R, beta))
        div_R = beta * kl_t_R + (1.0 - beta) * kl_s_R
        aux_R = kl_s_R
    return RowStats(div_R, ent_s_R, ent_t_R, log_zs_R, log_zt_R, aux_R)


# ----------------------------------------------------------------------------- KL without cancellation
# KL(P || Q) = E_P[z_P - z_Q] - (log Z_P - log Z_Q) subtracts two log-normalizers of size ~log V;
# for nearly equal distributions (true KL 1e-7 at V=151,936) their float32 rounding (~1e-6) is
# larger than the result. Relative to per-row centres c_P, c_Q (the running maxima) let
#   u = (z_P - z_Q) - (c_P - c_Q),   s_P = sum e^(z_P - c_P),   s_Q = sum e^(z_Q - c_Q);
# then KL(P || Q) = E_P[u] - log(s_P / s_Q) for any centres, and
#   s_P - s_Q = sum e^(z_Q - c_Q) expm1(u)     ("excess", summed term by term)
# gives log(s_P / s_Q) = log1p(excess / s_Q) with no difference of large numbers: each term is as
# small as u, and u itself is formed from z_P - z_Q (exact when the two logits are close).

EXPM1_NEAR = 1.0 / 16


def expm1_near(u):
    """expm1(u) to float32 precision for |u| <= EXPM1_NEAR (Taylor to u^5; Mosaic has no expm1)."""
    return u * (1.0 + u * (0.5 + u * (1.0 / 6.0 + u * (1.0 / 24.0 + u * (1.0 / 120.0)))))


def expm1_any(u):
    """expm1(u) for any float32 u: the polynomial near 0, exp(u) - 1 elsewhere (at most 4 bits lost)."""
    near = jnp.abs(u) < EXPM1_NEAR
    return jnp.where(near, expm1_near(jnp.where(near, u, 0.0)), jnp.exp(u) - 1.0)


def expm1_minus_identity(x):
    """expm1(x) - x >= 0 to float32 relative precision for any float32 x (Taylor from x^2 near 0,
    where the plain difference would keep only ~|x| / eps bits); +inf at x = -inf."""
    near = jnp.abs(x) < EXPM1_NEAR
    xn = jnp.where(near, x, 0.0)
    series = xn * xn * (0.5 + xn * (1.0 / 6.0 + xn * (1.0 / 24.0 + xn * (1.0 / 120.0 + xn * (1.0 / 720.0)))))
    return jnp.where(near, series, jnp.expm1(x) - x)


def kl_block_sums(zp_RxC, zq_RxC, cp_R, cq_R, ep_RxC, eq_RxC):
    """(gap, excess) float32 [R] of one block for KL(P || Q): gap = sum e^(z_P - c_P) u and
    excess = sum e^(z_Q - c_Q) expm1(u), u = (z_P - z_Q) - (c_P - c_Q); ep / eq are the two
    exponentials e^(z - c) the caller already has. -inf logits contribute their exact limits."""
    u_RxC = (zp_RxC - zq_RxC) - (cp_R - cq_R)[:, None]
    gap_R = jnp.sum(xlogy_safe(ep_RxC, u_RxC), axis=-1)
    return gap_R, jnp.sum(mass_differences(u_RxC, ep_RxC, eq_RxC), axis=-1)


def mass_differences(u, ep, eq):
    """e_P - e_Q per entry, given u = log(e_P / e_Q): e_Q expm1(u) where |u| is small, so the
    difference keeps its digits; elsewhere (or where either side is 0) the plain difference has
    no cancellation worth the name, and e_Q * expm1(u) could be 0 * inf."""
    near = jnp.abs(u) < EXPM1_NEAR
    return jnp.where(near, eq * expm1_near(jnp.where(near, u, 0.0)), ep - eq)


def kl_from_sums(gap_R, excess_R, sum_p_R, sum_q_R):
    """KL(P || Q) = gap / s_P - log1p(excess / s_Q), float32 [R]."""
    return gap_R / sum_p_R - jnp.log1p(excess_R / sum_q_R)


# The JSD's log-ratios, log(m / p) with m = beta p_t + (1 - beta) p_s, have the same problem: as
# log p - log m each subtracts two numbers of size ~log V, and their float32 rounding (~1e-6 per
# entry) is far above the JSD of nearly equal rows (1e-8 .. 1e-6 at V = 151,936). From
#   w = log p_t - log p_s = (z_t - z_s) - (log Z_t - log Z_s)
# (a difference of close logits, plus one per-row constant whose error only rescales p_t, which
# changes the JSD by that error times itself), log(m / p_s) = log1p(beta expm1(w)) is exact to
# float32 relative precision for every entry.


def log_mixture_ratios(zs_RxC, zt_RxC, log_zs_R, log_zt_R, beta: float):
    """(log(m / p_s), log(m / p_t)), float32 [R, C], m = beta p_t + (1 - beta) p_s, from scaled
    logits and the two log-normalizers [R]. Where w > 0 the roles swap, so expm1's argument is
    always -|w| (no overflow) and an entry only one side excludes gets the finite limit on the side
    that has mass (+inf on the other, where the caller multiplies by p = 0)."""
    return log_mixture_ratios_from_w((zt_RxC - zs_RxC) - (log_zt_R - log_zs_R)[:, None], beta)


def log_mixture_ratios_from_w(w_RxC, beta: float):
    """(log(m / p_s), log(m / p_t)), float32 [R, C], from w = log p_t - log p_s (see above)."""
    student_side_RxC = w_RxC <= 0
    down_RxC = jnp.where(student_side_RxC, w_RxC, -w_RxC)
    weight_RxC = jnp.where(student_side_RxC, beta, 1.0 - beta)
    log_ratio_RxC = jnp.log1p(weight_RxC * expm1_any(down_RxC))
    return (jnp.where(student_side_RxC, log_ratio_RxC, log_ratio_RxC + w_RxC),
            jnp.where(student_side_RxC, log_ratio_RxC - w_RxC, log_ratio_RxC))


def _jsd_kls(ps_RxC, pt_RxC, log_m_over_ps_RxC, log_m_over_pt_RxC):
    """(KL(p_s || m), KL(p_t || m)) summed over the block's columns, float32 [R] each."""
    return (-jnp.sum(xlogy_safe(ps_RxC, log_m_over_ps_RxC), axis=-1),
            -jnp.sum(xlogy_safe(pt_RxC, log_m_over_pt_RxC), axis=-1))


def _reframe_kl(gap_R, excess_R, side_p, side_q):
    """gap and excess re-expressed relative to new centres. side_*: (old sum, old_shift = old centre
    - new centre, rescale = e^old_shift (0 for an empty side), empty: no finite logit so far)."""
    sum_p_R, shift_p_R, rescale_p_R, empty_p_R = side_p
    sum_q_R, shift_q_R, rescale_q_R, empty_q_R = side_q
    d_R = shift_p_R - shift_q_R  # u_new = u_old + d
    new_gap_R = rescale_p_R * (gap_R + d_R * sum_p_R)
    # excess_new = e^shift_q (e^d excess + expm1(d) s_Q); an empty side makes excess = +-(the other sum).
    both_R = rescale_q_R * (jnp.exp(d_R) * excess_R + expm1_any(d_R) * sum_q_R)
    new_excess_R = jnp.where(empty_q_R, rescale_p_R * excess_R, jnp.where(empty_p_R, rescale_q_R * excess_R, both_R))
    return new_gap_R, new_excess_R


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
        log_m_over_ps_RxC, _ = log_mixture_ratios(zs_RxC, zt_RxC, log_zs_R, log_zt_R, beta)
        d_RxC = (1.0 - beta) * xlogy_safe(ps_RxC, -log_m_over_ps_RxC - aux_R[:, None])
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


def slice_targets(targets_N, offset, limit):
    """Global token ids int32 [N] -> columns of the vocabulary slice that starts at `offset`, -1
    outside [0, limit): a slice's padded tail must not match a target of the next slice."""
    local_N = targets_N - offset
    return jnp.where((local_N >= 0) & (local_N < limit), local_N, -1)


class OnlineStats(NamedTuple):
    """Running statistics of one row over vocabulary blocks (all float32 [R]).

    Per distribution, relative to its running max m: s = sum e^(z - m) and b = sum e^(z - m) (z - m).
    For the KLs (beta 0: P = teacher, Q = student; beta 1: the reverse; unused by the JSD) the gap
    and excess of `kl_block_sums` relative to the two running maxima, which give the KL in one pass
    without subtracting log-normalizers.
    """

    student_max: jnp.ndarray
    student_sum: jnp.ndarray
    student_centered: jnp.ndarray
    teacher_max: jnp.ndarray
    teacher_sum: jnp.ndarray
    teacher_centered: jnp.ndarray
    kl_gap: jnp.ndarray
    kl_excess: jnp.ndarray


def online_init(rows: int) -> OnlineStats:
    zero_R = jnp.zeros((rows,), jnp.float32)
    minus_inf_R = jnp.full((rows,), NEG_INF, jnp.float32)
    return OnlineStats(minus_inf_R, zero_R, zero_R, minus_inf_R, zero_R, zero_R, zero_R, zero_R)


class _Side(NamedTuple):
    centre: jnp.ndarray  # the new max, 0 where still -inf
    shift: jnp.ndarray  # old centre - new centre (0 for an empty history)
    rescale: jnp.ndarray  # e^shift, 0 for an empty history
    empty: jnp.ndarray  # bool: no finite logit before


def _recentre(m_R, new_m_R) -> _Side:
    centre_R = jnp.where(jnp.isfinite(new_m_R), new_m_R, 0.0)
    had_R = jnp.isfinite(m_R)
    # exp(-inf - finite) = 0 drops the empty history; a still-empty row keeps its zeros.
    shift_R = jnp.where(had_R, m_R - centre_R, 0.0)
    return _Side(centre_R, shift_R, jnp.where(had_R, jnp.exp(shift_R), 0.0), ~had_R)


def _fold_one(m_R, s_R, b_R, z_RxC):
    """One distribution's (max, sum, centered sum) after a block, its re-centring, and e^(z - m)."""
    new_m_R = jnp.maximum(m_R, jnp.max(z_RxC, axis=-1))
    side = _recentre(m_R, new_m_R)
    e_RxC = jnp.exp(z_RxC - side.centre[:, None])
    new_s_R = side.rescale * s_R + jnp.sum(e_RxC, axis=-1)
    # b is centered on m; moving the center by delta adds delta * s.
    new_b_R = side.rescale * (b_R + side.shift * s_R) + jnp.sum(
        xlogy_safe(e_RxC, z_RxC - side.centre[:, None]), axis=-1
    )
    return (new_m_R, new_s_R, new_b_R), side, e_RxC


def online_fold(stats: OnlineStats, zs_RxC, zt_RxC, beta: float) -> OnlineStats:
    """Fold one vocabulary block of scaled logits (float32 [R, C], -inf = excluded) into the stats."""
    student, s_side, es_RxC = _fold_one(stats.student_max, stats.student_sum, stats.student_centered, zs_RxC)
    teacher, t_side, et_RxC = _fold_one(stats.teacher_max, stats.teacher_sum, stats.teacher_centered, zt_RxC)
    gap_R, excess_R = stats.kl_gap, stats.kl_excess
    mode = divergence_mode(beta)
    if mode != "jsd":
        s_old = (stats.student_sum, s_side.shift, s_side.rescale, s_side.empty)
        t_old = (stats.teacher_sum, t_side.shift, t_side.rescale, t_side.empty)
        s_new = (zs_RxC, s_side.centre, es_RxC)
        t_new = (zt_RxC, t_side.centre, et_RxC)
        (p_old, p_new), (q_old, q_new) = ((t_old, t_new), (s_old, s_new)) if mode == "forward" else (
            (s_old, s_new), (t_old, t_new))
        gap_R, excess_R = _reframe_kl(gap_R, excess_R, p_old, q_old)
        block_gap_R, block_excess_R = kl_block_sums(p_new[0], q_new[0], p_new[1], q_new[1], p_new[2], q_new[2])
        gap_R, excess_R = gap_R + block_gap_R, excess_R + block_excess_R
    return OnlineStats(*student, *teacher, gap_R, excess_R)


def online_log_normalizers(stats: OnlineStats):
    """(log Z_student, log Z_teacher), float32 [R] each, from folded stats."""
    safe_sm_R = jnp.where(jnp.isfinite(stats.student_max), stats.student_max, 0.0)
    safe_tm_R = jnp.where(jnp.isfinite(stats.teacher_max), stats.teacher_max, 0.0)
    return safe_sm_R + jnp.log(stats.student_sum), safe_tm_R + jnp.log(stats.teacher_sum)


def _mass(max_R, sum_R, log_z_R):
    """sum_j exp(z_j - log_z) of one row, float32 [R]: 1 up to the rounding of log_z = max + log(sum)
    (about ulp(max), 2e-6 for logits near 20), taken exactly: max - log_z is exact (Sterbenz) and
    log(sum) is small. 1 for a row without allowed columns."""
    centre_R = jnp.where(jnp.isfinite(max_R), max_R, 0.0)
    return jnp.where(sum_R > 0, jnp.exp((centre_R - log_z_R) + jnp.log(sum_R)), 1.0)


def online_finish(stats: OnlineStats, beta: float, jsd_kl_s_R=None, jsd_kl_t_R=None) -> RowStats:
    """Per-token results from the folded stats; the JSD needs its two second-pass KLs passed in.

    Those KLs were summed over p = exp(z - log_z), whose mass is 1 only up to log_z's rounding;
    dividing by that mass gives the sums over the exactly normalized p that `full_row_stats`
    forms. It matters to the gradient: p_s (log(p_s / m) - KL(p_s || m)) cancels at a token the
    student is sure of (p_s ~ 0.99: by a factor of 20 to 250), where a KL off by its mass's 1e-6 left
    ~2e-4 relative error on the vocabulary-split and statistics-first paths (BUILD_NOTES, issue
    12)."""
    log_zs_R, log_zt_R = online_log_normalizers(stats)
    if jsd_kl_s_R is not None:
        jsd_kl_s_R = jsd_kl_s_R / _mass(stats.student_max, stats.student_sum, log_zs_R)
        jsd_kl_t_R = jsd_kl_t_R / _mass(stats.teacher_max, stats.teacher_sum, log_zt_R)
    # H = log Z - E[z] = log s - E[z - m]
    ent_s_R = jnp.log(stats.student_sum) - stats.student_centered / stats.student_sum
    ent_t_R = jnp.log(stats.teacher_sum) - stats.teacher_centered / stats.teacher_sum
    mode = divergence_mode(beta)
    if mode == "forward":
        div_R = kl_from_sums(stats.kl_gap, stats.kl_excess, stats.teacher_sum, stats.student_sum)
        aux_R = div_R
    elif mode == "reverse":
        div_R = kl_from_sums(stats.kl_gap, stats.kl_excess, stats.student_sum, stats.teacher_sum)
        aux_R = div_R
    else:
        div_R = beta * jsd_kl_t_R + (1.0 - beta) * jsd_kl_s_R
        aux_R = jsd_kl_s_R
    return RowStats(div_R, ent_s_R, ent_t_R, log_zs_R, log_zt_R, aux_R)


def jsd_block_kls(zs_RxC, zt_RxC, log_zs_R, log_zt_R, beta: float):
    """This block's share of KL(p_s || m) and KL(p_t || m), float32 [R] each (second JSD pass)."""
    ps_RxC = jnp.exp(zs_RxC - log_zs_R[:, None])
    pt_RxC = jnp.exp(zt_RxC - log_zt_R[:, None])
    return _jsd_kls(ps_RxC, pt_RxC, *log_mixture_ratios(zs_RxC, zt_RxC, log_zs_R, log_zt_R, beta))


def online_partial(zs_RxC, zt_RxC, beta: float) -> OnlineStats:
    """Stats of one vocabulary slice (float32 [R, C] scaled logits, -inf = excluded), ready for
    `online_combine` with the other slices of the same rows."""
    return online_fold(online_init(zs_RxC.shape[0]), zs_RxC, zt_RxC, beta)


def online_combine(stats: OnlineStats, axis_name, beta: float) -> OnlineStats:
    """Whole-row stats from each shard's stats of its vocabulary slice (float32 [R] each).

    Collectives over `axis_name` (a mesh axis or a tuple of them; () or None: nothing to combine):
    one pmax for the two maxima, then one psum of the six sums re-centred on them. A shard whose
    slice holds no allowed column (m = -inf) contributes zeros.
    """
    if not axis_name:
        return stats
    m_s_R, m_t_R = jax.lax.pmax((stats.student_max, stats.teacher_max), axis_name)
    s_side = _recentre(stats.student_max, m_s_R)
    t_side = _recentre(stats.teacher_max, m_t_R)
    local = (
        s_side.rescale * stats.student_sum, s_side.rescale * (stats.student_centered + s_side.shift * stats.student_sum),
        t_side.rescale * stats.teacher_sum, t_side.rescale * (stats.teacher_centered + t_side.shift * stats.teacher_sum),
    )
    gap_R, excess_R = stats.kl_gap, stats.kl_excess
    mode = divergence_mode(beta)
    if mode != "jsd":
        s_old = (stats.student_sum, s_side.shift, s_side.rescale, s_side.empty)
        t_old = (stats.teacher_sum, t_side.shift, t_side.rescale, t_side.empty)
        p_old, q_old = (t_old, s_old) if mode == "forward" else (s_old, t_old)
        gap_R, excess_R = _reframe_kl(gap_R, excess_R, p_old, q_old)
    ss, sb, ts, tb, gap_R, excess_R = jax.lax.psum(local + (gap_R, excess_R), axis_name)
    return OnlineStats(m_s_R, ss, sb, m_t_R, ts, tb, gap_R, excess_R)


def finish_row_stats(stats: OnlineStats, beta: float, jsd_kls=None) -> RowStats:
    """`online_finish` for whole-row stats; jsd_kls: (KL(p_s||m), KL(p_t||m)) float32 [R], only
    for the JSD (None otherwise)."""
    if divergence_mode(beta) == "jsd":
        return online_finish(stats, beta, *jsd_kls)
    return online_finish(stats, beta)


# ----------------------------------------------------------------------------- one distribution alone
# The student's statistics without a teacher (api.student_statistics): what a loss's weights may
# depend on (entropy, the target's log-probability), at a quarter of the fused sweep's FLOPs.


def side_partial(z_RxC):
    """(max, sum e^(z - max), sum e^(z - max) (z - max)) of one block, float32 [R] each."""
    m_R = jnp.max(z_RxC, axis=-1)
    centre_R = jnp.where(jnp.isfinite(m_R), m_R, 0.0)
    e_RxC = jnp.exp(z_RxC - centre_R[:, None])
    return m_R, jnp.sum(e_RxC, axis=-1), jnp.sum(xlogy_safe(e_RxC, z_RxC - centre_R[:, None]), axis=-1)


def side_combine(m_R, s_R, b_R, axis_name):
    """`side_partial` of whole rows from each vocabulary shard's (pmax, then one psum)."""
    if not axis_name:
        return m_R, s_R, b_R
    new_m_R = jax.lax.pmax(m_R, axis_name)
    side = _recentre(m_R, new_m_R)
    s_R, b_R = jax.lax.psum((side.rescale * s_R, side.rescale * (b_R + side.shift * s_R)), axis_name)
    return new_m_R, s_R, b_R


def side_finish(m_R, s_R, b_R):
    """(log-normalizer, entropy), float32 [R], of rows with these whole-row statistics."""
    centre_R = jnp.where(jnp.isfinite(m_R), m_R, 0.0)
    return centre_R + jnp.log(s_R), jnp.log(s_R) - b_R / s_R
