"""Pallas GPU (Triton) kernels for the divergence; the Pallas interpreter on other backends.

Letters: N tokens, V vocabulary, H hidden width (Hs student, Ht teacher), R rows per token block,
C columns per vocabulary block.

Triton programs do not keep state across grid steps, so each program owns a token block (or, for
the head gradient, a vocabulary block) and loops over the other axis itself with an online
logsumexp in registers. Triton wants power-of-two tiles, so R, C and the hidden widths are powers
of two; a block that would run past the end starts earlier instead (no masks, no padding), and
a reduction skips the rows or columns such a block revisits, while pointwise results simply
write the same values twice.

Never validated on a real GPU in this repository (no GPU on the build host): the interpreter runs
the oracle tests, and benchmarks/divergence.py --gpu measures it where a GPU exists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from opsd_jax.kernels import pallas_common, rows
from opsd_jax.kernels.spec import DivergenceSpec

TOKEN_BLOCK = 64
VOCAB_BLOCK = 256


def _pow2_at_most(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _blocks(n: int, vocab: int, spec: DivergenceSpec):
    r = min(_pow2_at_most(spec.token_block or TOKEN_BLOCK), _pow2_at_most(n))
    c = min(_pow2_at_most(spec.vocab_block or VOCAB_BLOCK), _pow2_at_most(vocab))
    return r, c


def _check_widths(inputs):
    for name, x in zip(("student_hidden", "student_head", "teacher_hidden", "teacher_head"), inputs):
        width = x.shape[1] if name.endswith("hidden") else x.shape[0]
        if width & (width - 1):
            raise ValueError(f"pallas_gpu needs power-of-two hidden widths (Triton tiles); {name} has {width}")


def _limit(spec, vocab):
    return vocab if spec.valid_vocab is None else spec.valid_vocab


def _start(index, block, total):
    nominal = index * block
    return nominal, jnp.minimum(nominal, total - block)


def _tile(in_refs, row0, col0, r, c, spec, limit, projected, first_col=None):
    """Scaled float32 student and teacher logits [R, C] at (row0, col0); columns below first_col
    (already counted by the previous block) and at or past limit are -inf."""
    rows_ = pl.ds(row0, r)
    cols = pl.ds(col0, c)
    if projected:
        hs_ref, ws_ref, ht_ref, wt_ref = in_refs
        raw_s = jnp.dot(hs_ref[rows_, :], ws_ref[:, cols], preferred_element_type=jnp.float32)
        raw_t = jnp.dot(ht_ref[rows_, :], wt_ref[:, cols], preferred_element_type=jnp.float32)
    else:
        raw_s, raw_t = in_refs[0][rows_, cols], in_refs[1][rows_, cols]
    column_1xC = rows.columns(c, col0)
    ok_1xC = column_1xC < limit
    if first_col is not None:
        ok_1xC = ok_1xC & (column_1xC >= first_col)

    def scaled(raw_RxC):
        z_RxC = raw_RxC.astype(jnp.float32)
        if spec.temperature != 1.0:
            z_RxC = z_RxC * (1.0 / spec.temperature)
        return jnp.where(ok_1xC, z_RxC, rows.NEG_INF)

    return scaled(raw_s), scaled(raw_t), ok_1xC


def _stats_kernel(*refs, n_in, n, vocab, r, c, spec, with_targets):
    in_refs = refs[:n_in]
    rest = list(refs[n_in:])
    tgt_ref = rest.pop(0) if with_targets else None
    out_refs = rest
    projected = n_in == 4
    limit = _limit(spec, vocab)
    _, row0 = _start(pl.program_id(0), r, n)
    tgt_R = tgt_ref[pl.ds(row0, r)] if with_targets else None
    blocks = pl.cdiv(vocab, c)

    def fold(j, carry):
        stats, ts, tt = carry
        first, col0 = _start(j, c, vocab)
        zs, zt, _ = _tile(in_refs, row0, col0, r, c, spec, limit, projected, first)
        stats = rows.online_fold(stats, zs, zt)
        if with_targets:
            # A revisited column holds -inf here; its target was already counted.
            fresh_tgt_R = jnp.where(tgt_R >= first, tgt_R, -1)
            ts = ts + rows.target_logit(zs, fresh_tgt_R, col0)
            tt = tt + rows.target_logit(zt, fresh_tgt_R, col0)
        return stats, ts, tt

    zero_R = jnp.zeros((r,), jnp.float32)
    stats, ts, tt = jax.lax.fori_loop(0, blocks, fold, (rows.online_init(r), zero_R, zero_R))
    if rows.divergence_mode(spec.beta) == "jsd":
        log_zs, log_zt = rows.online_log_normalizers(stats)

        def second(j, kls):
            first, col0 = _start(j, c, vocab)
            zs, zt, _ = _tile(in_refs, row0, col0, r, c, spec, limit, projected, first)
            kl_s, kl_t = rows.jsd_block_kls(zs, zt, log_zs, log_zt, spec.beta)
            return kls[0] + kl_s, kls[1] + kl_t

        kl_s, kl_t = jax.lax.fori_loop(0, blocks, second, (zero_R, zero_R))
        done = rows.online_finish(stats, spec.beta, kl_s, kl_t)
    else:
        done = rows.online_finish(stats, spec.beta)
    values = tuple(done) + ((ts, tt) if with_targets else ())
    for ref, v_R in zip(out_refs, values):
        ref[pl.ds(row0, r)] = v_R


def _grad_tile(in_refs, vec_refs, row0, col0, r, c, spec, limit, projected, first_col=None):
    zs, zt, ok_1xC = _tile(in_refs, row0, col0, r, c, spec, limit, projected, first_col)
    log_zs, log_zt, aux, ent_s, keep, cot_d, cot_h, cot_lp, tgt = (ref[pl.ds(row0, r)] for ref in vec_refs)
    g = rows.student_grad_tile(zs, zt, log_zs, log_zt, aux, ent_s, spec.beta, cot_d, cot_h, cot_lp, tgt, col0)
    return jnp.where(ok_1xC & (keep[:, None] > 0), g * (1.0 / spec.temperature), 0.0)


def _logits_grad_kernel(*refs, n, vocab, r, c, spec):
    in_refs, vec_refs, out_ref = refs[:2], refs[2:11], refs[11]
    _, row0 = _start(pl.program_id(0), r, n)
    _, col0 = _start(pl.program_id(1), c, vocab)
    g = _grad_tile(in_refs, vec_refs, row0, col0, r, c, spec, _limit(spec, vocab), False)
    out_ref[pl.ds(row0, r), pl.ds(col0, c)] = g.astype(out_ref.dtype)


def _hidden_grad_kernel(*refs, n, vocab, r, c, spec):
    in_refs, vec_refs, out_ref = refs[:4], refs[4:13], refs[13]
    ws_ref = in_refs[1]
    _, row0 = _start(pl.program_id(0), r, n)

    def step(j, acc_RxH):
        first, col0 = _start(j, c, vocab)
        g = _grad_tile(in_refs, vec_refs, row0, col0, r, c, spec, _limit(spec, vocab), True, first)
        w_HxC = ws_ref[:, pl.ds(col0, c)]
        return acc_RxH + jax.lax.dot_general(
            g.astype(w_HxC.dtype), w_HxC, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = jax.lax.fori_loop(0, pl.cdiv(vocab, c), step, jnp.zeros((r, ws_ref.shape[0]), jnp.float32))
    out_ref[pl.ds(row0, r), :] = acc


def _head_grad_kernel(*refs, n, vocab, r, c, spec):
    in_refs, vec_refs, out_ref = refs[:4], refs[4:13], refs[13]
    hs_ref = in_refs[0]
    _, col0 = _start(pl.program_id(0), c, vocab)

    def step(i, acc_HxC):
        first, row0 = _start(i, r, n)
        g = _grad_tile(in_refs, vec_refs, row0, col0, r, c, spec, _limit(spec, vocab), True)
        fresh_Rx1 = row0 + jax.lax.broadcasted_iota(jnp.int32, (r, 1), 0) >= first
        g = jnp.where(fresh_Rx1, g, 0.0)
        h_RxH = hs_ref[pl.ds(row0, r), :]
        return acc_HxC + jax.lax.dot_general(
            h_RxH, g.astype(h_RxH.dtype), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = jax.lax.fori_loop(0, pl.cdiv(n, r), step, jnp.zeros((hs_ref.shape[1], c), jnp.float32))
    out_ref[:, pl.ds(col0, c)] = acc


def _call(kernel, out_shape, grid, spec, *args):
    interpret = spec.interpret if spec.interpret is not None else jax.default_backend() != "gpu"
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=interpret)(*args)


def row_stats(inputs, targets_N, spec: DivergenceSpec):
    projected = len(inputs) == 4
    if projected:
        _check_widths(inputs)
        n, vocab = inputs[0].shape[0], inputs[1].shape[1]
    else:
        n, vocab = inputs[0].shape
    r, c = _blocks(n, vocab, spec)
    with_targets = targets_N is not None
    n_out = 6 + 2 * with_targets
    kernel = functools.partial(
        _stats_kernel, n_in=len(inputs), n=n, vocab=vocab, r=r, c=c, spec=spec, with_targets=with_targets
    )
    args = tuple(inputs) + ((targets_N,) if with_targets else ())
    outs = _call(kernel, [jax.ShapeDtypeStruct((n,), jnp.float32)] * n_out, (pl.cdiv(n, r),), spec, *args)
    return rows.RowStats(*outs[:6]), ((outs[6], outs[7]) if with_targets else None)


def _grad_vectors(stats, cots, targets_N, n):
    cot_d, cot_h, cot_lp = pallas_common.full_cotangents(cots, n)
    keep = ((cot_d != 0) | (cot_h != 0) | (cot_lp != 0)).astype(jnp.float32)
    tgt = jnp.full((n,), -1, jnp.int32) if targets_N is None else targets_N
    return (stats.student_log_z_R, stats.teacher_log_z_R, stats.aux_R, stats.student_entropy_R, keep, cot_d, cot_h, cot_lp, tgt)


def logits_grad(s_NxV, t_NxV, stats, cots, targets_N, spec: DivergenceSpec):
    n, vocab = s_NxV.shape
    r, c = _blocks(n, vocab, spec)
    kernel = functools.partial(_logits_grad_kernel, n=n, vocab=vocab, r=r, c=c, spec=spec)
    return _call(
        kernel, jax.ShapeDtypeStruct((n, vocab), s_NxV.dtype), (pl.cdiv(n, r), pl.cdiv(vocab, c)), spec,
        s_NxV, t_NxV, *_grad_vectors(stats, cots, targets_N, n),
    )


def fused_grads(hs, ws, ht, wt, stats, cots, targets_N, spec: DivergenceSpec):
    n, vocab = hs.shape[0], ws.shape[1]
    r, c = _blocks(n, vocab, spec)
    vectors = _grad_vectors(stats, cots, targets_N, n)
    kw = dict(n=n, vocab=vocab, r=r, c=c, spec=spec)
    gh = _call(
        functools.partial(_hidden_grad_kernel, **kw), jax.ShapeDtypeStruct(hs.shape, jnp.float32),
        (pl.cdiv(n, r),), spec, hs, ws, ht, wt, *vectors,
    )
    gw = _call(
        functools.partial(_head_grad_kernel, **kw), jax.ShapeDtypeStruct(ws.shape, jnp.float32),
        (pl.cdiv(vocab, c),), spec, hs, ws, ht, wt, *vectors,
    )
    return gh, gw


divergence, fused_linear_divergence = pallas_common.make(pallas_common.Backend(row_stats, logits_grad, fused_grads))
