"""Pallas GPU (Triton) kernels for the divergence; the Pallas interpreter on other backends.

Letters: N tokens, V vocabulary, H hidden width (Hs student, Ht teacher), R rows per token block,
C columns per vocabulary block, K hidden columns per chunk.

Triton programs do not keep state across grid steps, so each program owns a token block and
loops over the vocabulary itself with an online logsumexp in registers. Triton wants power-of-two
tiles, so R and C are powers of two; a block that would run past the end starts earlier instead
(no masks, no padding), and a reduction skips the rows or columns such a block revisits, while
pointwise results simply write the same values twice.

Hidden widths: any multiple of 128 (Qwen3's 2560 and 4096 included; powers of two below 128 too).
The projections loop over K=128-wide chunks of the hidden dimension, accumulating the [R, C]
logits tile in float32, so no [R, H] or [H, C] value is ever live; inputs may be bf16 (the MXU /
tensor-core products accumulate in float32).

Backward: one kernel, one recomputation of each tile. A program owns a token block and walks the
vocabulary; for each tile it forms G and then, chunk by chunk of the hidden dimension, adds
G W^T into its own d/dh rows (read-modify-write in global memory: no other program touches
them) and h^T G into d/dW with atomic adds (every token block contributes to every column).
12 N H V FLOPs with the statistics sweep; the float atomics make d/dW's summation order, and so
its last bits, vary from run to run.

Token blocks without a kept row are skipped (their program returns at once); their output rows
are selected away afterwards.

Vocabulary slices (vocab_parallel.LocalBackend, for a shard_map over a multi-GPU mesh): every
kernel takes the slice's bound on allowed columns as an int32 [1] operand, the statistics kernel
returns the running statistics of its slice unfinished, and the JSD's second loop is a kernel of
its own that takes the rows' whole-vocabulary normalizers, so the slices can be completed by
collectives between the two. One device is one slice.

Never validated on a real GPU in this repository (no GPU on the build host): the interpreter runs
the oracle tests, and benchmarks/divergence.py --gpu measures it where a GPU exists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from opsd_jax.kernels import pallas_common, rows, vocab_parallel
from opsd_jax.kernels.spec import DivergenceSpec

TOKEN_BLOCK = 64
VOCAB_BLOCK = 256
HIDDEN_CHUNK = 128


def _pow2_at_most(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _blocks(n: int, vocab: int, spec: DivergenceSpec):
    r = min(_pow2_at_most(spec.token_block or TOKEN_BLOCK), _pow2_at_most(n))
    c = min(_pow2_at_most(spec.vocab_block or VOCAB_BLOCK), _pow2_at_most(vocab))
    return r, c


def hidden_chunk(width: int) -> int | None:
    """K for a hidden width: 128 for multiples of 128, the width itself for a power of two below
    128, None otherwise (Triton tiles are powers of two)."""
    if width % HIDDEN_CHUNK == 0:
        return HIDDEN_CHUNK
    if width < HIDDEN_CHUNK and width & (width - 1) == 0:
        return width
    return None


def _check_widths(inputs):
    for name, x in zip(("student_hidden", "student_head", "teacher_hidden", "teacher_head"), inputs):
        width = x.shape[1] if name.endswith("hidden") else x.shape[0]
        if hidden_chunk(width) is None:
            raise ValueError(
                f"pallas_gpu needs hidden widths that are multiples of {HIDDEN_CHUNK} (or powers of two below "
                f"it: Triton tiles); {name} has {width}"
            )


def _limit(spec, vocab):
    return vocab if spec.valid_vocab is None else spec.valid_vocab


def _default_limit(spec, vocab):
    """The int32 [1] bound of a whole vocabulary: valid_vocab, or every column."""
    return jnp.full((1,), _limit(spec, vocab), jnp.int32)


def _start(index, block, total):
    nominal = index * block
    return nominal, jnp.minimum(nominal, total - block)


def _project(h_ref, w_ref, rows_, cols, r, c):
    """float32 [R, C] = h[rows] @ W[:, cols], accumulated over K-wide chunks of the hidden width."""
    width = h_ref.shape[1]
    k = hidden_chunk(width)

    def chunk(q, acc_RxC):
        ks = pl.ds(pl.multiple_of(q * k, k), k)
        return acc_RxC + jnp.dot(h_ref[rows_, ks], w_ref[ks, cols], preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, width // k, chunk, jnp.zeros((r, c), jnp.float32))


def _tile(in_refs, row0, col0, r, c, spec, limit, projected, first_col=None):
    """Scaled float32 student and teacher logits [R, C] at (row0, col0); columns below first_col
    (already counted by the previous block) and at or past limit are -inf."""
    rows_ = pl.ds(row0, r)
    cols = pl.ds(col0, c)
    if projected:
        hs_ref, ws_ref, ht_ref, wt_ref = in_refs
        raw_s = _project(hs_ref, ws_ref, rows_, cols, r, c)
        raw_t = _project(ht_ref, wt_ref, rows_, cols, r, c)
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


def _stats_kernel(limit_ref, *refs, n_in, n, vocab, r, c, spec, with_targets):
    """Program = token block: its rows' running statistics (rows.OnlineStats) over the columns
    below limit_ref[0], and the targets' scaled logits (0 where a target lies elsewhere)."""
    in_refs = refs[:n_in]
    rest = list(refs[n_in:])
    mask_ref = rest.pop(0)
    tgt_ref = rest.pop(0) if with_targets else None
    out_refs = rest
    projected = n_in == 4
    limit = limit_ref[0]
    _, row0 = _start(pl.program_id(0), r, n)

    @pl.when(jnp.max(mask_ref[pl.ds(row0, r)]) > 0)  # (Triton has no reduce_or)
    def _run():
        tgt_R = tgt_ref[pl.ds(row0, r)] if with_targets else None

        def fold(j, carry):
            stats, ts, tt = carry
            first, col0 = _start(j, c, vocab)
            zs, zt, _ = _tile(in_refs, row0, col0, r, c, spec, limit, projected, first)
            stats = rows.online_fold(stats, zs, zt, spec.beta)
            if with_targets:
                # A revisited column holds -inf here; its target was already counted.
                fresh_tgt_R = jnp.where(tgt_R >= first, tgt_R, -1)
                ts = ts + rows.target_logit(zs, fresh_tgt_R, col0)
                tt = tt + rows.target_logit(zt, fresh_tgt_R, col0)
            return stats, ts, tt

        zero_R = jnp.zeros((r,), jnp.float32)
        stats, ts, tt = jax.lax.fori_loop(0, pl.cdiv(vocab, c), fold, (rows.online_init(r), zero_R, zero_R))
        values = tuple(stats) + ((ts, tt) if with_targets else ())
        for ref, v_R in zip(out_refs, values):
            ref[pl.ds(row0, r)] = v_R


def _jsd_kernel(limit_ref, *refs, n_in, n, vocab, r, c, spec):
    """Program = token block: its rows' shares of KL(p_s||m) and KL(p_t||m) over the columns below
    limit_ref[0], given the rows' whole-vocabulary log-normalizers."""
    in_refs = refs[:n_in]
    mask_ref, log_zs_ref, log_zt_ref, kl_s_ref, kl_t_ref = refs[n_in:]
    limit = limit_ref[0]
    _, row0 = _start(pl.program_id(0), r, n)
    rows_ = pl.ds(row0, r)

    @pl.when(jnp.max(mask_ref[rows_]) > 0)
    def _run():
        log_zs, log_zt = log_zs_ref[rows_], log_zt_ref[rows_]

        def add(j, kls):
            first, col0 = _start(j, c, vocab)
            zs, zt, _ = _tile(in_refs, row0, col0, r, c, spec, limit, n_in == 4, first)
            kl_s, kl_t = rows.jsd_block_kls(zs, zt, log_zs, log_zt, spec.beta)
            return kls[0] + kl_s, kls[1] + kl_t

        zero_R = jnp.zeros((r,), jnp.float32)
        kl_s, kl_t = jax.lax.fori_loop(0, pl.cdiv(vocab, c), add, (zero_R, zero_R))
        kl_s_ref[rows_] = kl_s
        kl_t_ref[rows_] = kl_t


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


def _grad_kernel(limit_ref, *refs, n, vocab, r, c, spec):
    """Program = token block: d/dh of its rows (owned, read-modify-write) and its share of d/dW
    (atomic adds), one tile at a time; rows a clamped block revisits are left to their owner.
    Columns at or past limit_ref[0] get no gradient."""
    in_refs, vec_refs = refs[:4], refs[4:13]
    gh_ref, gw_ref = refs[-2], refs[-1]  # refs[13:15] are their zero-initialised aliases
    hs_ref, ws_ref = in_refs[0], in_refs[1]
    width = hs_ref.shape[1]
    k = hidden_chunk(width)
    nominal, row0 = _start(pl.program_id(0), r, n)
    rows_ = pl.ds(row0, r)
    keep_R = vec_refs[4][rows_]
    limit = limit_ref[0]
    fresh_Rx1 = row0 + jax.lax.broadcasted_iota(jnp.int32, (r, 1), 0) >= nominal
    # The rows this program adds to d/dW: its own (not revisited) kept ones. An ignored row's
    # hidden state may be NaN, which g's zeros would not cancel in h^T G.
    row_ok_Rx1 = fresh_Rx1 & (keep_R[:, None] > 0)

    @pl.when(jnp.max(keep_R) > 0)
    def _run():
        def vocab_step(j, carry):
            first, col0 = _start(j, c, vocab)
            cols = pl.ds(col0, c)
            g = _grad_tile(in_refs, vec_refs, row0, col0, r, c, spec, limit, True, first)
            g = jnp.where(row_ok_Rx1, g, 0.0)

            def hidden_step(q, carry):
                ks = pl.ds(pl.multiple_of(q * k, k), k)
                w_KxC = ws_ref[ks, cols]
                gh_RxK = jax.lax.dot_general(g.astype(w_KxC.dtype), w_KxC, (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)
                gh_ref[rows_, ks] = gh_ref[rows_, ks] + gh_RxK
                h_RxK = jnp.where(row_ok_Rx1, hs_ref[rows_, ks], 0)
                gw_KxC = jax.lax.dot_general(h_RxK, g.astype(h_RxK.dtype), (((0,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)
                plt.atomic_add(gw_ref, (ks, cols), gw_KxC)
                return carry

            return jax.lax.fori_loop(0, width // k, hidden_step, carry)

        jax.lax.fori_loop(0, pl.cdiv(vocab, c), vocab_step, 0)


def _call(kernel, out_shape, grid, spec, *args, aliases=None):
    interpret = spec.interpret if spec.interpret is not None else jax.default_backend() != "gpu"
    # Triton explicitly: without compiler params jax now lowers GPU pallas_calls through Mosaic GPU,
    # which would stage every ref in shared memory.
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=interpret,
                          compiler_params=plt.CompilerParams(num_warps=4),
                          input_output_aliases=aliases or {})(*args)


def _shape(inputs):
    """(N, V) of (logits s, t) or (hs, ws, ht, wt); the hidden widths checked for Triton."""
    if len(inputs) == 4:
        _check_widths(inputs)
        return inputs[0].shape[0], inputs[1].shape[1]
    return inputs[0].shape


def slice_stats(inputs, targets_N, mask_N, limit, spec: DivergenceSpec):
    """vocab_parallel.LocalBackend.stats: running statistics (rows.OnlineStats, float32 [N]) of
    these columns and the targets' scaled logits (0 where a target lies outside them) or None.
    inputs: (logits s, t [N, V]) or (hs, ws, ht, wt); targets_N: int32 column ids or None;
    mask_N: bool (token blocks without a kept row are skipped, their rows hold garbage); limit:
    int32 [1] or scalar, columns at or past it are excluded."""
    n, vocab = _shape(inputs)
    r, c = _blocks(n, vocab, spec)
    with_targets = targets_N is not None
    n_out = len(rows.OnlineStats._fields) + 2 * with_targets
    kernel = functools.partial(
        _stats_kernel, n_in=len(inputs), n=n, vocab=vocab, r=r, c=c, spec=spec, with_targets=with_targets
    )
    args = tuple(inputs) + (mask_N.astype(jnp.int32),) + ((targets_N,) if with_targets else ())
    outs = _call(kernel, [jax.ShapeDtypeStruct((n,), jnp.float32)] * n_out, (pl.cdiv(n, r),), spec,
                 jnp.reshape(limit, (1,)).astype(jnp.int32), *args)
    n_stats = len(rows.OnlineStats._fields)
    return rows.OnlineStats(*outs[:n_stats]), (tuple(outs[n_stats:]) if with_targets else None)


def slice_jsd_kls(inputs, log_zs_N, log_zt_N, mask_N, limit, spec: DivergenceSpec):
    """vocab_parallel.LocalBackend.jsd_kls: these columns' shares of KL(p_s||m), KL(p_t||m) [N]."""
    n, vocab = _shape(inputs)
    r, c = _blocks(n, vocab, spec)
    kernel = functools.partial(_jsd_kernel, n_in=len(inputs), n=n, vocab=vocab, r=r, c=c, spec=spec)
    vec = jax.ShapeDtypeStruct((n,), jnp.float32)
    kl_s, kl_t = _call(kernel, [vec, vec], (pl.cdiv(n, r),), spec, jnp.reshape(limit, (1,)).astype(jnp.int32),
                       *inputs, mask_N.astype(jnp.int32), log_zs_N, log_zt_N)
    return kl_s, kl_t


def row_stats(inputs, targets_N, mask_N, spec: DivergenceSpec):
    """pallas_common.Backend.row_stats: the whole vocabulary is one slice."""
    local = vocab_parallel.LocalBackend(slice_stats, slice_jsd_kls, None)
    return vocab_parallel.combined_row_stats(local, inputs, targets_N, mask_N,
                                             _default_limit(spec, _shape(inputs)[1]), spec)


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


def slice_grads(hs, ws, ht, wt, stats, cots, targets_N, limit, spec: DivergenceSpec):
    """vocab_parallel.LocalBackend.grads: (float32 [N, Hs] d/dh through these columns, float32
    [Hs, V] d/dW of these columns) from one recomputation of each tile; stats: whole-row
    rows.RowStats; limit: int32 [1] or scalar."""
    n, vocab = hs.shape[0], ws.shape[1]
    r, c = _blocks(n, vocab, spec)
    vectors = _grad_vectors(stats, cots, targets_N, n)
    kernel = functools.partial(_grad_kernel, n=n, vocab=vocab, r=r, c=c, spec=spec)
    zeros = (jnp.zeros(hs.shape, jnp.float32), jnp.zeros(ws.shape, jnp.float32))
    first_alias = 1 + 4 + len(vectors)
    gh, gw = _call(
        kernel, [jax.ShapeDtypeStruct(hs.shape, jnp.float32), jax.ShapeDtypeStruct(ws.shape, jnp.float32)],
        (pl.cdiv(n, r),), spec, jnp.reshape(limit, (1,)).astype(jnp.int32), hs, ws, ht, wt, *vectors, *zeros,
        aliases={first_alias: 0, first_alias + 1: 1},
    )
    # Skipped token blocks wrote nothing; their rows hold the zeros they started with.
    return gh, gw


def fused_grads(hs, ws, ht, wt, stats, cots, targets_N, spec: DivergenceSpec):
    """pallas_common.Backend.fused_grads: the whole vocabulary is one slice."""
    _check_widths((hs, ws, ht, wt))
    return slice_grads(hs, ws, ht, wt, stats, cots, targets_N, _default_limit(spec, ws.shape[1]), spec)


LOCAL = vocab_parallel.LocalBackend(slice_stats, slice_jsd_kls, slice_grads)
divergence, fused_linear_divergence = pallas_common.make(pallas_common.Backend(row_stats, logits_grad, fused_grads))
