"""Chunked XLA implementation: bounded working memory on any backend, the default on CPU and GPU.

Letters: N tokens, V vocabulary, Hs / Ht hidden widths, R rows in a token block, C columns in a
vocabulary block.

From logits (`divergence`): token blocks x vocabulary blocks with an online logsumexp, so the
forward never holds more than a few [R, C] float32 tiles; the backward is one elementwise pass
that XLA fuses into the [N, V] gradient it has to return anyway.

From hidden states (`fused_linear_divergence`): token blocks of full vocabulary rows. A full row
gives both normalizers at once, so the forward also forms the student gradient products
(d/dh = G W^T and d/dW = h^T G, with G the per-logit gradient) while the logits tile is live:
two projections plus two gradient products, with no recomputation, for every beta including the
JSD. Those products are formed for the cotangent the caller's loss will give the divergence
(`weights`, default the mask: sum and mean losses); the backward only scales them when the
actual cotangent is a multiple of it, and otherwise sweeps the tiles once more for the remainder
(the trip count is decided at run time).

On a mesh that splits the vocabulary (vocab_parallel.py) a shard holds an [R, v] slice of each
block's rows; the block's row statistics are completed across the slices by collectives while
the tile is live (one pmax and one psum of [R] vectors, one more psum for the JSD's KLs and one
for the target logits), so the same single sweep forms this slice's share of d/dh and its own
d/dW: 8 N H V in all, where a statistics-first sweep recomputes the tiles (12 N H V).

Token blocks without a kept row are not visited at all: the loops run over the list of blocks
that hold one (padding at the end of short sequences costs nothing). Blocks that would run past
the end start earlier instead (no padding copy of the inputs); the rows or columns they revisit
are excluded so nothing is counted twice.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from opsd_jax.kernels import rows, tpu_vmem
from opsd_jax.kernels.spec import DivergenceOutput, DivergenceSpec

TOKEN_BLOCK = 256
VOCAB_BLOCK = 8192
FUSED_TOKEN_BLOCK = 128
# Every token block reads both heads (bf16 for the MXU, 4 bytes per column and hidden unit) and
# adds into the float32 d/dW accumulator (8 bytes read and written) against 8 R FLOPs: 2R/3 FLOP
# per byte, under v5p's ~166 at R = 128 (HBM-bound) and twice it at 512. Larger blocks also make
# larger [R, v] float32 tiles (a few live at once): 512 rows of Qwen3's 37,984-column slice are
# 78 MB a tile, of its whole 151,936-column rows 311 MB. So on TPU a block has up to
# TPU_FUSED_TOKEN_BLOCK rows, fewer (down to FUSED_TOKEN_BLOCK, in multiples of it) where a tile
# would pass TPU_TILE_BYTES. The AOT compile at H = 4096 (BUILD_NOTES, issue 12): 0.98 GiB of
# temporaries at 512 rows of a 37,984-column slice (0.69 since the heads are read where they lie);
# whole rows on fsdp 4 take 2.71 GiB at 128 rows and 3.29 at 512.
TPU_FUSED_TOKEN_BLOCK = 512
TPU_TILE_BYTES = 80 * 2**20
# d/dW is added one slice of at most this many vocabulary columns at a time: the slice's product
# [C, H] and its sum with the accumulator are two float32 temporaries. 4,096 columns (3,840 of
# Qwen3's 37,984-column shard) took the kernel's temporaries at t f = 4 from 1.02 to 0.75 GiB
# (BUILD_NOTES, issue 12); each slice's product still has 512 x 4,096 operands for the MXU.
HEAD_GRAD_SLICE = 4096
# The backward reuses the forward's gradient products when every token's cotangent is within this
# relative distance of c * weights (a few dozen float32 ulps: the loss's own rounding of the same
# weights), and sweeps again otherwise.
WEIGHTS_RTOL = 2.0**-18
# The backward divides the remainder's cotangents by the scale c and multiplies the sum back by it;
# a smaller |c| is not used (see split_cotangent).
MIN_SCALE = 2.0**-60


def _clamped_start(index, block: int, total: int):
    """(nominal, actual) start of block `index`: actual = min(nominal, total - block)."""
    nominal = index * block
    return nominal, jnp.minimum(nominal, total - block)


def active_blocks(active_N, block: int):
    """(int32 [B] indices of the token blocks holding an active row, first the active ones in
    order; int32 number of them). Block b's own rows are b*R .. b*R+R-1 (a clamped last block
    also revisits earlier rows, which belong to the block before)."""
    n = active_N.shape[0]
    count = -(-n // block)
    padded = jnp.zeros((count * block,), jnp.bool_).at[:n].set(active_N)
    flags_B = jnp.any(padded.reshape(count, block), axis=1)
    order_B = jnp.nonzero(flags_B, size=count, fill_value=0)[0].astype(jnp.int32)
    return order_B, jnp.sum(flags_B, dtype=jnp.int32)


def over_active_blocks(order_B, count, block, init):
    """block(k, carry) for k in 0 .. count-1 (the active blocks, `order_B[k]` being the k-th), as a
    loop of static length B whose later steps are a `cond` away. The static bound is what lets XLA
    and `opsd-jax plan` read the loop's trip count (a run-time bound is counted once); a skipped
    step costs one predicate."""
    def step(k, carry):
        return jax.lax.cond(k < count, block, lambda _, same: same, k, carry)

    return jax.lax.fori_loop(0, order_B.shape[0], step, init)


def _mask_outputs(stats: rows.RowStats, mask_N):
    return stats._replace(
        divergence_R=jnp.where(mask_N, stats.divergence_R, 0.0),
        student_entropy_R=jnp.where(mask_N, stats.student_entropy_R, 0.0),
        teacher_entropy_R=jnp.where(mask_N, stats.teacher_entropy_R, 0.0),
    )


def _target_logprobs(student_logits_NxV, teacher_logits_NxV, targets_N, stats: rows.RowStats, mask_N, spec):
    """log p_s[target], log p_t[target] (float32 [N]) by gathering N logits, not scanning V."""
    if targets_N is None:
        return None, None
    idx_Nx1 = targets_N[:, None]
    zs_N = jnp.take_along_axis(student_logits_NxV, idx_Nx1, axis=-1)[:, 0].astype(jnp.float32)
    zt_N = jnp.take_along_axis(teacher_logits_NxV, idx_Nx1, axis=-1)[:, 0].astype(jnp.float32)
    lp_s_N = zs_N / spec.temperature - stats.student_log_z_R
    lp_t_N = zt_N / spec.temperature - stats.teacher_log_z_R
    return jnp.where(mask_N, lp_s_N, 0.0), jnp.where(mask_N, lp_t_N, 0.0)


# ----------------------------------------------------------------------------- from logits


def _row_stats_from_logits(student_logits_NxV, teacher_logits_NxV, mask_N, spec: DivergenceSpec) -> rows.RowStats:
    n, vocab = student_logits_NxV.shape
    r = min(spec.token_block or TOKEN_BLOCK, n)
    c = min(spec.vocab_block or VOCAB_BLOCK, vocab)
    order_B, count = active_blocks(mask_N, r)
    vocab_blocks = -(-vocab // c)

    def z_block(logits_NxV, row0, j):
        nominal, col0 = _clamped_start(j, c, vocab)
        tile_RxC = jax.lax.dynamic_slice(logits_NxV, (row0, col0), (r, c))
        z_RxC = rows.scaled_logits(tile_RxC, spec.temperature, spec.valid_vocab, col0)
        column_C = col0 + jnp.arange(c, dtype=jnp.int32)
        return jnp.where(column_C[None, :] >= nominal, z_RxC, rows.NEG_INF)

    def token_block(k, outs):
        _, row0 = _clamped_start(order_B[k], r, n)

        def fold(j, stats):
            zs_RxC = z_block(student_logits_NxV, row0, j)
            return rows.online_fold(stats, zs_RxC, z_block(teacher_logits_NxV, row0, j), spec.beta)

        stats = jax.lax.fori_loop(0, vocab_blocks, fold, rows.online_init(r))
        if rows.divergence_mode(spec.beta) == "jsd":
            log_zs_R, log_zt_R = rows.online_log_normalizers(stats)

            def second_pass(j, kls):
                kl_s_R, kl_t_R = rows.jsd_block_kls(
                    z_block(student_logits_NxV, row0, j),
                    z_block(teacher_logits_NxV, row0, j),
                    log_zs_R,
                    log_zt_R,
                    spec.beta,
                )
                return kls[0] + kl_s_R, kls[1] + kl_t_R

            zero_R = jnp.zeros((r,), jnp.float32)
            kl_s_R, kl_t_R = jax.lax.fori_loop(0, vocab_blocks, second_pass, (zero_R, zero_R))
            block_stats = rows.online_finish(stats, spec.beta, kl_s_R, kl_t_R)
        else:
            block_stats = rows.online_finish(stats, spec.beta)
        # Rows a clamped block revisits get the same values again, so overwriting is harmless.
        return tuple(jax.lax.dynamic_update_slice(o_N, v_R, (row0,)) for o_N, v_R in zip(outs, block_stats))

    init = tuple(jnp.zeros((n,), jnp.float32) for _ in rows.RowStats._fields)
    return rows.RowStats(*over_active_blocks(order_B, count, token_block, init))


def _outputs_from_logits(student_logits_NxV, teacher_logits_NxV, mask_N, targets_N, spec):
    stats = _row_stats_from_logits(student_logits_NxV, teacher_logits_NxV, mask_N, spec)
    lp_s_N, lp_t_N = _target_logprobs(student_logits_NxV, teacher_logits_NxV, targets_N, stats, mask_N, spec)
    kept = _mask_outputs(stats, mask_N)
    out = DivergenceOutput(kept.divergence_R, kept.student_entropy_R, kept.teacher_entropy_R, lp_s_N, lp_t_N)
    return out, stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _divergence(student_logits_NxV, teacher_logits_NxV, mask_N, targets_N, spec):
    return _outputs_from_logits(student_logits_NxV, teacher_logits_NxV, mask_N, targets_N, spec)[0]


def _divergence_fwd(student_logits_NxV, teacher_logits_NxV, mask_N, targets_N, spec):
    out, stats = _outputs_from_logits(student_logits_NxV, teacher_logits_NxV, mask_N, targets_N, spec)
    return out, (student_logits_NxV, teacher_logits_NxV, mask_N, targets_N, stats)


def _student_cotangents(cot: DivergenceOutput, mask_N, targets_N):
    """Cotangents of the three student outputs, zeroed for ignored tokens (float32 [N] or None)."""

    def kept(x_N):
        return None if x_N is None else jnp.where(mask_N, x_N.astype(jnp.float32), 0.0)

    cot_lp_N = kept(cot.student_logprob) if targets_N is not None else None
    return kept(cot.divergence), kept(cot.student_entropy), cot_lp_N


def _divergence_bwd(spec, residuals, cot: DivergenceOutput):
    student_logits_NxV, teacher_logits_NxV, mask_N, targets_N, stats = residuals
    cot_d_N, cot_h_N, cot_lp_N = _student_cotangents(cot, mask_N, targets_N)
    zs_NxV = rows.scaled_logits(student_logits_NxV, spec.temperature, spec.valid_vocab)
    zt_NxV = rows.scaled_logits(teacher_logits_NxV, spec.temperature, spec.valid_vocab)
    g_NxV = rows.student_grad_tile(
        zs_NxV, zt_NxV, stats.student_log_z_R, stats.teacher_log_z_R, stats.aux_R,
        stats.student_entropy_R, spec.beta, cot_d_N, cot_h_N, cot_lp_N, targets_N,
    )
    # where, not multiply: an ignored row may hold garbage whose gradient is NaN.
    g_NxV = jnp.where(mask_N[:, None], g_NxV * (1.0 / spec.temperature), 0.0)
    return g_NxV.astype(student_logits_NxV.dtype), None, None, None


_divergence.defvjp(_divergence_fwd, _divergence_bwd)


def divergence(student_logits_NxV, teacher_logits_NxV, mask_N, targets_N, spec: DivergenceSpec):
    """DivergenceOutput (float32 [N] each) from float [N, V] logits; see api.divergence."""
    return _divergence(student_logits_NxV, teacher_logits_NxV, mask_N, targets_N, spec)


# ----------------------------------------------------------------------------- fused with the heads


def fused_token_block(n: int, vocab: int, spec: DivergenceSpec) -> int:
    """Rows per token block of the sweeps from hidden states over `vocab` columns:
    spec.token_block, else FUSED_TOKEN_BLOCK, or on a TPU the most rows up to
    TPU_FUSED_TOKEN_BLOCK whose float32 tile stays within TPU_TILE_BYTES (a multiple of
    FUSED_TOKEN_BLOCK, at least one)."""
    if spec.token_block:
        return min(spec.token_block, n)
    if not spec.tpu_generation:
        return min(FUSED_TOKEN_BLOCK, n)
    fitting = TPU_TILE_BYTES // (4 * vocab) // FUSED_TOKEN_BLOCK * FUSED_TOKEN_BLOCK
    return min(max(FUSED_TOKEN_BLOCK, min(TPU_FUSED_TOKEN_BLOCK, fitting)), n)


class _Heads(NamedTuple):
    """Both heads as the token-block loops read them (`_loop_heads`): each [H, V], or its
    transpose [V, H] where its flag says so (`_vocab_major`)."""

    student: jax.Array
    teacher: jax.Array | None
    student_major: bool
    teacher_major: bool

    @property
    def vocab(self) -> int:
        return self.student.shape[0 if self.student_major else 1]


def _vocab_major(spec: DivergenceSpec, width: int, vocab: int) -> bool:
    """Whether the sweeps read an [H, V] head as its transpose [V, H] and form its d/dW as
    [V, H]: on a TPU, where XLA stores such a head shard column-major (tpu_vmem.vocab_major), so
    the transpose is a bitcast. The loops' operands are laid out row-major in their own shapes:
    an [H, V] operand, or accumulator, cost a head-sized copy of each (BUILD_NOTES, issue 12)."""
    return spec.tpu_generation is not None and tpu_vmem.vocab_major(width, vocab, spec.head_hidden_shards)


def _loop_heads(spec: DivergenceSpec, ws_HsxV, wt_HtxV=None) -> _Heads:
    """The heads [H, V] oriented for the loops. Called outside every loop that reads them: a
    transpose inside one would leave the loop's operand [H, V], and copied."""
    vocab = ws_HsxV.shape[1]
    s_major = _vocab_major(spec, ws_HsxV.shape[0], vocab)
    t_major = wt_HtxV is not None and _vocab_major(spec, wt_HtxV.shape[0], vocab)
    return _Heads(ws_HsxV.T if s_major else ws_HsxV,
                  None if wt_HtxV is None else wt_HtxV.T if t_major else wt_HtxV, s_major, t_major)


def _project(hidden_NxH, head, vocab_major, row0, r, spec, limit=None):
    """Scaled float32 logits [R, V] of rows row0..row0+R, and those hidden rows [R, H].

    head: [H, V], or [V, H] when vocab_major. limit: None excludes columns from
    spec.valid_vocab on; else an int32 scalar (a vocabulary slice's own bound, known only at run
    time) does.
    """
    hidden_RxH = jax.lax.dynamic_slice_in_dim(hidden_NxH, row0, r, axis=0)
    contract = 1 if vocab_major else 0
    logits_RxV = jax.lax.dot_general(hidden_RxH, head, (((1,), (contract,)), ((), ())),
                                     preferred_element_type=jnp.float32)
    if limit is None:
        return rows.scaled_logits(logits_RxV, spec.temperature, spec.valid_vocab), hidden_RxH
    z_RxV = rows.scaled_logits(logits_RxV, spec.temperature, None)
    return jnp.where(rows.columns(z_RxV.shape[1]) < limit, z_RxV, rows.NEG_INF), hidden_RxH


def _gradient_products(g_RxV, hidden_RxH, head, acc, vocab_major=False):
    """(G W^T float32 [R, H], acc + h^T G) with G rounded to the head's dtype, as the forward's
    matmul inputs were. head [H, V] and acc float32 [H, V], or both transposed ([V, H]) when
    vocab_major (`_vocab_major`).

    h^T G goes into acc one vocabulary slice at a time: a whole [H, V] product would be a second
    head-sized temporary next to acc, since XLA does not fuse the add into the matmul.
    """
    g_RxV = g_RxV.astype(head.dtype)
    contract = 0 if vocab_major else 1
    gh_RxH = jax.lax.dot_general(g_RxV, head, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32)
    vocab = g_RxV.shape[1]
    # Equal slices of at most HEAD_GRAD_SLICE columns (rounded up to 128): a clamped last slice
    # recomputes the columns it revisits, 1% of the product for Qwen3's 37,984-column shard in
    # 3,840-column slices (8% in plain 8,192-column ones).
    per_slice = -(-vocab // -(-vocab // HEAD_GRAD_SLICE))
    c = min(vocab, -(-per_slice // 128) * 128)
    vocab_axis = 0 if vocab_major else 1

    def add_slice(j, acc):
        nominal, col0 = _clamped_start(j, c, vocab)
        g_RxC = jax.lax.dynamic_slice_in_dim(g_RxV, col0, c, axis=1)
        # A clamped last slice revisits columns; count them once.
        g_RxC = jnp.where(rows.columns(c, col0) >= nominal, g_RxC, 0)
        # [C, H] = G^T h for a vocabulary-major acc, else [H, C] = h^T G.
        lhs, rhs = (g_RxC, hidden_RxH) if vocab_major else (hidden_RxH, g_RxC)
        gw = jax.lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(acc, col0, c, axis=vocab_axis)
        return jax.lax.dynamic_update_slice_in_dim(acc, old + gw, col0, axis=vocab_axis)

    return gh_RxH, jax.lax.fori_loop(0, -(-vocab // c), add_slice, acc)


def _block_stats(zs_RxV, zt_RxV, beta: float, axis_name) -> rows.RowStats:
    """Whole-row statistics of one token block from its scaled logits tiles (float32 [R, V], or
    [R, v] slices of the rows when axis_name names the mesh axes that hold the other slices)."""
    if not axis_name:
        return rows.full_row_stats(zs_RxV, zt_RxV, beta)
    stats = rows.online_combine(rows.online_partial(zs_RxV, zt_RxV, beta), axis_name, beta)
    kls = None
    if rows.divergence_mode(beta) == "jsd":
        # The tiles are still live, so the JSD's second pass costs no recomputation.
        log_zs_R, log_zt_R = rows.online_log_normalizers(stats)
        kls = jax.lax.psum(rows.jsd_block_kls(zs_RxV, zt_RxV, log_zs_R, log_zt_R, beta), axis_name)
    return rows.finish_row_stats(stats, beta, kls)


def _fused_pass(hs_NxHs, heads: _Heads, ht_NxHt, mask_N, targets_N, spec, cotangents=None, grads0=None,
                active_N=None, limit=None, axis_name=()):
    """One sweep over the token blocks that hold an active row (default: a kept one). heads: both
    heads as `_loop_heads` orients them.

    cotangents None: outputs only. Otherwise a triple of float32 [N] (divergence, entropy,
    log-prob; the last two may be None) and the sweep also adds the student gradients to
    grads0 (float32 [N, Hs], float32 [Hs, V] or [V, Hs] as the student head is oriented; zeros when
    None) and returns them.
    active_N: bool [N] (may be traced), the rows that need a visit; all False visits nothing.
    limit, axis_name: None and () for whole rows. For one vocabulary slice of the rows: its int32
    bound (columns at or past it are excluded) and the mesh axes holding the other slices, over
    which every block's statistics are completed (every shard of such a group must see the same
    active_N, which it does: the tokens and their cotangents are the same on all of them).
    targets_N are then slice columns (-1 elsewhere), d/dh is this slice's share and the head
    gradient this slice's [Hs, v].
    """
    n, hs_width = hs_NxHs.shape
    vocab = heads.vocab
    r = fused_token_block(n, vocab, spec)
    order_B, count = active_blocks(mask_N if active_N is None else active_N, r)
    want_grads = cotangents is not None
    with_targets = targets_N is not None
    stat_names = rows.RowStats._fields + (("student_target", "teacher_target") if with_targets else ())

    def block(k, carry):
        outs, grads = carry
        nominal, row0 = _clamped_start(order_B[k], r, n)
        fresh_R = row0 + jnp.arange(r) >= nominal
        zs_RxV, hs_RxHs = _project(hs_NxHs, heads.student, heads.student_major, row0, r, spec, limit)
        zt_RxV, _ = _project(ht_NxHt, heads.teacher, heads.teacher_major, row0, r, spec, limit)
        stats = _block_stats(zs_RxV, zt_RxV, spec.beta, axis_name)
        values = tuple(stats)
        if with_targets:
            tgt_R = jax.lax.dynamic_slice_in_dim(targets_N, row0, r)
            target_logits = (rows.target_logit(zs_RxV, tgt_R), rows.target_logit(zt_RxV, tgt_R))
            if axis_name:
                # Only the slice holding a row's target contributes a nonzero logit.
                target_logits = jax.lax.psum(target_logits, axis_name)
            values += target_logits
        outs = tuple(jax.lax.dynamic_update_slice(o_N, v_R, (row0,)) for o_N, v_R in zip(outs, values))
        if want_grads:
            keep_R = fresh_R & jax.lax.dynamic_slice_in_dim(mask_N, row0, r)

            def cut(x_N):
                return None if x_N is None else jnp.where(keep_R, jax.lax.dynamic_slice_in_dim(x_N, row0, r), 0.0)

            cot_d_R, cot_h_R, cot_lp_R = (cut(x) for x in cotangents)
            g_RxV = rows.student_grad_tile(
                zs_RxV, zt_RxV, stats.student_log_z_R, stats.teacher_log_z_R, stats.aux_R,
                stats.student_entropy_R, spec.beta, cot_d_R, cot_h_R, cot_lp_R,
                tgt_R if with_targets else None,
            )
            g_RxV = jnp.where(keep_R[:, None], g_RxV * (1.0 / spec.temperature), 0.0)
            gh_NxHs, acc_head = grads
            # An ignored row's hidden state may be NaN, and h^T G would spread 0 * NaN into the head.
            hs_RxHs = jnp.where(keep_R[:, None], hs_RxHs, 0)
            gh_RxHs, acc_head = _gradient_products(g_RxV, hs_RxHs, heads.student, acc_head, heads.student_major)
            # Revisited rows contribute zeros here (keep_R is False for them).
            old_RxHs = jax.lax.dynamic_slice_in_dim(gh_NxHs, row0, r)
            gh_NxHs = jax.lax.dynamic_update_slice_in_dim(gh_NxHs, old_RxHs + gh_RxHs, row0, axis=0)
            grads = (gh_NxHs, acc_head)
        return outs, grads

    outs0 = tuple(jnp.zeros((n,), jnp.float32) for _ in stat_names)
    if want_grads and grads0 is None:
        grads0 = (jnp.zeros((n, hs_width), jnp.float32), _head_grad_zeros(hs_width, vocab, spec))
    carry0 = (outs0, grads0 if want_grads else ())
    if active_N is None:
        outs, grads = over_active_blocks(order_B, count, block, carry0)
    else:
        # The backward's remainder sweep visits the rows whose cotangents the forward did not
        # foresee: none in training, so its bound stays a run-time one (a static bound would make
        # the plan count a full sweep that never runs).
        outs, grads = jax.lax.fori_loop(0, count, block, carry0)
    stats = rows.RowStats(*outs[: len(rows.RowStats._fields)])
    lp_s_N = lp_t_N = None
    if with_targets:
        lp_s_N = jnp.where(mask_N, outs[-2] - stats.student_log_z_R, 0.0)
        lp_t_N = jnp.where(mask_N, outs[-1] - stats.teacher_log_z_R, 0.0)
    kept = _mask_outputs(stats, mask_N)
    out = DivergenceOutput(kept.divergence_R, kept.student_entropy_R, kept.teacher_entropy_R, lp_s_N, lp_t_N)
    return out, grads


def _unit_cotangent(mask_N, weights_N):
    """The divergence cotangent the forward forms its gradient products for, float32 [N]."""
    if weights_N is None:
        return mask_N.astype(jnp.float32)
    return jnp.where(mask_N, weights_N.astype(jnp.float32), 0.0)


def split_cotangent(cot_d_N, unit_N):
    """(c, remainder): cot_d = c * unit + remainder, with the remainder exactly 0 where it is within
    WEIGHTS_RTOL of c * unit (the loss's own rounding). c is read at the largest |unit|; where that
    gives 0, or a c so small that dividing the other cotangents by it could overflow, c is 1 (the
    whole difference is then remainder, which is exact and costs one sweep)."""
    k = jnp.argmax(jnp.abs(unit_N))
    c = jnp.where(unit_N[k] != 0, cot_d_N[k] / jnp.where(unit_N[k] != 0, unit_N[k], 1.0), 0.0)
    c = jnp.where(jnp.isfinite(c) & (jnp.abs(c) >= MIN_SCALE), c, 1.0)
    scaled_N = c * unit_N
    rest_N = cot_d_N - scaled_N
    return c, jnp.where(jnp.abs(rest_N) <= WEIGHTS_RTOL * jnp.abs(scaled_N), 0.0, rest_N)


def _remainder(c, rest_d_N, cot_h_N, cot_lp_N):
    """(bool [N] rows the backward's remainder sweep must visit, its cotangents divided by c):
    the divergence's remainder after `split_cotangent` and whole entropy / log-prob cotangents."""
    active_N = rest_d_N != 0.0
    for x_N in (cot_h_N, cot_lp_N):
        if x_N is not None:
            active_N = active_N | (x_N != 0.0)
    return active_N, tuple(None if x_N is None else x_N / c for x_N in (rest_d_N, cot_h_N, cot_lp_N))


def _scaled_grads(c, gh_NxHs, gw_head, hs_NxHs, ws_HsxV, spec):
    """(d/dh, d/dW) in the inputs' dtypes: c times the swept sums, the head gradient back in
    [Hs, V] orientation (`_vocab_major`)."""
    gw_HsxV = gw_head.T if _vocab_major(spec, *ws_HsxV.shape) else gw_head
    return (c * gh_NxHs).astype(hs_NxHs.dtype), (c * gw_HsxV).astype(ws_HsxV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _fused(hs_NxHs, ws_HsxV, ht_NxHt, wt_HtxV, mask_N, targets_N, weights_N, limit, spec, axis_name):
    return _fused_pass(hs_NxHs, _loop_heads(spec, ws_HsxV, wt_HtxV), ht_NxHt, mask_N, targets_N, spec, None,
                       limit=limit, axis_name=axis_name)[0]


def _fused_fwd(hs_NxHs, ws_HsxV, ht_NxHt, wt_HtxV, mask_N, targets_N, weights_N, limit, spec, axis_name):
    unit_N = _unit_cotangent(mask_N, weights_N)
    out, (gh_unit_NxHs, gw_unit_head) = _fused_pass(
        hs_NxHs, _loop_heads(spec, ws_HsxV, wt_HtxV), ht_NxHt, mask_N, targets_N, spec, (unit_N, None, None),
        limit=limit,
        axis_name=axis_name,
    )
    return out, (hs_NxHs, ws_HsxV, ht_NxHt, wt_HtxV, mask_N, targets_N, limit, unit_N, gh_unit_NxHs, gw_unit_head)


def _fused_bwd(spec, axis_name, residuals, cot: DivergenceOutput):
    hs_NxHs, ws_HsxV, ht_NxHt, wt_HtxV, mask_N, targets_N, limit, unit_N, gh_unit_NxHs, gw_unit_head = residuals
    cot_d_N, cot_h_N, cot_lp_N = _student_cotangents(cot, mask_N, targets_N)
    if axis_name:
        # Inside vocab_parallel's shard_map: the outputs are replicated over the vocabulary axes,
        # so its transpose hands each slice 1/size of their cotangent; each slice's share of the
        # gradient needs all of it (see vocab_parallel._shard_bwd).
        cot_d_N, cot_h_N, cot_lp_N = (None if x is None else jax.lax.psum(x, axis_name)
                                      for x in (cot_d_N, cot_h_N, cot_lp_N))
    # The gradient is linear in the cotangents: c * (the forward's products + what the remainder
    # contributes at 1/c). When the loss gave the divergence c * weights (and the entropy and
    # log-prob nothing) the remainder is zero and its sweep visits no block. The sweep adds into
    # the forward's products themselves and the scaling comes last, so XLA can keep the one head
    # gradient buffer from the forward to the output (scaling first would make a second one).
    c, rest_d_N = split_cotangent(cot_d_N, unit_N)
    active_N, per_c = _remainder(c, rest_d_N, cot_h_N, cot_lp_N)
    _, (gh_NxHs, gw_head) = _fused_pass(
        hs_NxHs, _loop_heads(spec, ws_HsxV, wt_HtxV), ht_NxHt, mask_N, targets_N, spec, cotangents=per_c,
        grads0=(gh_unit_NxHs, gw_unit_head), active_N=active_N & mask_N, limit=limit, axis_name=axis_name,
    )
    return _scaled_grads(c, gh_NxHs, gw_head, hs_NxHs, ws_HsxV, spec) + (None,) * 6


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_linear_divergence(hs_NxHs, ws_HsxV, ht_NxHt, wt_HtxV, mask_N, targets_N, weights_N, spec: DivergenceSpec):
    """DivergenceOutput (float32 [N] each) from hidden states [N, H] and heads [H, V]; see
    api.fused_linear_divergence. weights_N: float32 [N] or None, the divergence cotangent (up to
    one scalar) the forward forms its gradient products for."""
    return _fused(hs_NxHs, ws_HsxV, ht_NxHt, wt_HtxV, mask_N, targets_N, weights_N, None, spec, ())


def slice_fused_linear_divergence(hs_nxHs, ws_HsxV, ht_nxHt, wt_HtxV, mask_n, targets_n, weights_n, limit,
                                  spec: DivergenceSpec, axis_name):
    """`fused_linear_divergence` of one shard inside vocab_parallel's shard_map, whose heads hold
    the vocabulary slice [H, v]: limit int32 scalar (slice columns at or past it are excluded),
    targets_n slice columns (-1 where the target lies in another slice), axis_name the mesh axes
    holding the other slices. Outputs are whole-row values [n]; the gradients are this slice's
    share of d/dh (summed over the slices by shard_map's transpose) and d/dW of this slice."""
    return _fused(hs_nxHs, ws_HsxV, ht_nxHt, wt_HtxV, mask_n, targets_n, weights_n, limit, spec, tuple(axis_name))


# ----------------------------------------------------------------------------- token rows gathered in chunks


# Chunks per shard of the group when the token rows are gathered over fsdp: 2 per shard makes a
# chunk's gathered rows half a shard's own rows. Measured at H = 4096, 8,192 tokens per chip, v5p
# (BUILD_NOTES, issue 12): 1 per shard 1.03 / 1.41 GiB of temporaries on 1,8,1 / 1,4,1, 2 per
# shard 0.73 / 1.32 GiB; what is left is mostly the heads and d/dW, which no chunking touches.
GATHER_CHUNKS_PER_SHARD = 2


def gather_chunks(n: int, group: int) -> int:
    """Into how many chunks a shard's n token rows go when a group of `group` shards gathers them
    (`gathered_fused_linear_divergence`): the fewest that divides n and is at least
    GATHER_CHUNKS_PER_SHARD x group, so a chunk's gathered rows, group x n / chunks, are at most
    half a shard's own n (n chunks of one row when nothing smaller divides n, or when n is below
    that count: then `group` rows)."""
    return next(c for c in range(min(GATHER_CHUNKS_PER_SHARD * group, n), n + 1) if n % c == 0)


def gathered_chunk(x_n, chunk, rows_per_chunk: int, gather_axes):
    """Rows chunk*r .. chunk*r + r - 1 of every shard of `gather_axes`, shard after shard: [f r, ...]."""
    part = jax.lax.dynamic_slice_in_dim(x_n, chunk * rows_per_chunk, rows_per_chunk)
    return jax.lax.all_gather(part, gather_axes, tiled=True)


def keep_own_rows(out_n, out_fxr, chunk, gather_axes):
    """out_n [n] with rows chunk*r .. chunk*r + r - 1 set to this shard's own part of out_fxr, a
    gathered chunk's values [f r] (`gathered_chunk`)."""
    r = out_fxr.shape[0] // jax.lax.axis_size(gather_axes)
    own_r = jax.lax.dynamic_slice_in_dim(out_fxr, jax.lax.axis_index(gather_axes) * r, r)
    return jax.lax.dynamic_update_slice_in_dim(out_n, own_r, chunk * r, axis=0)


def _head_grad_zeros(width: int, vocab: int, spec: DivergenceSpec):
    shape = (vocab, width) if _vocab_major(spec, width, vocab) else (width, vocab)
    return jnp.zeros(shape, jnp.float32)


def _gathered_pass(hs_nxHs, heads: _Heads, ht_nxHt, mask_n, targets_n, offset, limit, spec, axis_name,
                   gather_axes, group, cotangents=None, grads0=None, active_n=None):
    """`_fused_pass` over this shard's vocabulary slice for the token rows of a group of `group`
    shards (`gather_axes`), gathered a chunk at a time (`gather_chunks`): each chunk's rows are
    gathered, swept, and their outputs and d/dh handed back to the shard that owns them (a
    reduce-scatter of the slices' shares), so a shard holds at most half its own n rows' worth of
    gathered rows and their float32 d/dh (tiny n aside). Every shard of the group runs the same
    chunks in the same order, as the block statistics' collectives over `axis_name` (which include
    gather_axes) need.

    Own rows: hs [n, Hs], ht [n, Ht], mask bool [n], targets int32 [n] global token ids or None;
    offset / limit: this slice's first column and int32 bound. cotangents None: outputs only,
    every chunk visited (a static loop). Otherwise own-row float32 [n] triples as in
    `_fused_pass`, and the result's gradients are grads0 (d/dh float32 [n, Hs] of the own rows,
    head gradient of this slice) plus this pass's. active_n: bool [n] or None; when given, only
    chunks holding an active row of some shard are visited (a run-time loop).
    """
    n, width = hs_nxHs.shape
    chunks = gather_chunks(n, group)
    r = n // chunks
    want_grads = cotangents is not None
    with_targets = targets_n is not None

    def chunk_step(k, carry, order_C):
        outs, grads = carry
        c = order_C[k]

        def take(x_n):
            return None if x_n is None else gathered_chunk(x_n, c, r, gather_axes)

        tgt = rows.slice_targets(take(targets_n), offset, limit) if with_targets else None
        mask_c = take(mask_n)
        pass_grads0 = None
        if want_grads:
            pass_grads0 = (jnp.zeros((group * r, width), jnp.float32), grads[1])
        out_c, pass_grads = _fused_pass(
            take(hs_nxHs), heads, take(ht_nxHt), mask_c, tgt, spec,
            None if not want_grads else tuple(take(x) for x in cotangents), pass_grads0,
            active_N=None if active_n is None else take(active_n) & mask_c, limit=limit, axis_name=axis_name,
        )
        # Every shard of the group completed every gathered row; each keeps its own.
        outs = jax.tree.map(lambda o_n, o_c: keep_own_rows(o_n, o_c, c, gather_axes), outs, out_c)
        if want_grads:
            gh_c, gw = pass_grads
            mine_rxHs = jax.lax.psum_scatter(gh_c, gather_axes, scatter_dimension=0, tiled=True)
            gh_n = grads[0]
            gh_n = jax.lax.dynamic_update_slice_in_dim(
                gh_n, jax.lax.dynamic_slice_in_dim(gh_n, c * r, r) + mine_rxHs, c * r, axis=0)
            grads = (gh_n, gw)
        return outs, grads

    zeros = jnp.zeros((n,), jnp.float32)
    outs0 = DivergenceOutput(zeros, zeros, zeros, *((zeros, zeros) if with_targets else ()))
    if want_grads and grads0 is None:
        grads0 = (jnp.zeros((n, width), jnp.float32), _head_grad_zeros(width, heads.vocab, spec))
    carry0 = (outs0, grads0 if want_grads else ())
    if active_n is None:
        order_C = jnp.arange(chunks, dtype=jnp.int32)
        return jax.lax.fori_loop(0, chunks, functools.partial(chunk_step, order_C=order_C), carry0)
    # The chunks in which some shard of the group has an active row, chunk-major so that one
    # token "block" of active_blocks is one chunk of all the group's shards.
    active_fxn = jax.lax.all_gather(active_n & mask_n, gather_axes, tiled=False)
    by_chunk = active_fxn.reshape(group, chunks, r).transpose(1, 0, 2).reshape(-1)
    order_C, count = active_blocks(by_chunk, group * r)
    return jax.lax.fori_loop(0, count, functools.partial(chunk_step, order_C=order_C), carry0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12))
def _gathered(hs_nxHs, ws_HsxV, ht_nxHt, wt_HtxV, mask_n, targets_n, weights_n, offset, limit, spec, axis_name,
              gather_axes, group):
    return _gathered_pass(hs_nxHs, _loop_heads(spec, ws_HsxV, wt_HtxV), ht_nxHt, mask_n, targets_n, offset, limit,
                          spec, axis_name, gather_axes, group)[0]


def _gathered_fwd(hs_nxHs, ws_HsxV, ht_nxHt, wt_HtxV, mask_n, targets_n, weights_n, offset, limit, spec,
                  axis_name, gather_axes, group):
    unit_n = _unit_cotangent(mask_n, weights_n)
    out, (gh_unit_nxHs, gw_unit_head) = _gathered_pass(
        hs_nxHs, _loop_heads(spec, ws_HsxV, wt_HtxV), ht_nxHt, mask_n, targets_n, offset, limit, spec, axis_name,
        gather_axes, group, cotangents=(unit_n, None, None),
    )
    return out, (hs_nxHs, ws_HsxV, ht_nxHt, wt_HtxV, mask_n, targets_n, offset, limit, unit_n, gh_unit_nxHs,
                 gw_unit_head)


def _gathered_bwd(spec, axis_name, gather_axes, group, residuals, cot: DivergenceOutput):
    (hs_nxHs, ws_HsxV, ht_nxHt, wt_HtxV, mask_n, targets_n, offset, limit, unit_n, gh_unit_nxHs,
     gw_unit_head) = residuals
    cots = _student_cotangents(cot, mask_n, targets_n)
    # The outputs are split over gather_axes like the rows, and replicated over the other
    # vocabulary axes, whose shards shard_map's transpose hands 1/size of the cotangent each.
    replicated = tuple(a for a in axis_name if a not in gather_axes)
    if replicated:
        cots = tuple(None if x is None else jax.lax.psum(x, replicated) for x in cots)
    cot_d_n, cot_h_n, cot_lp_n = cots
    # One scale c for the whole group: its shards add into one head gradient from all their rows.
    n = unit_n.shape[0]
    me = jax.lax.axis_index(gather_axes)
    c, rest_fn = split_cotangent(jax.lax.all_gather(cot_d_n, gather_axes, tiled=True),
                                 jax.lax.all_gather(unit_n, gather_axes, tiled=True))
    rest_d_n = jax.lax.dynamic_slice_in_dim(rest_fn, me * n, n)
    active_n, per_c = _remainder(c, rest_d_n, cot_h_n, cot_lp_n)
    _, (gh_nxHs, gw_head) = _gathered_pass(
        hs_nxHs, _loop_heads(spec, ws_HsxV, wt_HtxV), ht_nxHt, mask_n, targets_n, offset, limit, spec, axis_name,
        gather_axes, group,
        cotangents=per_c, grads0=(gh_unit_nxHs, gw_unit_head), active_n=active_n,
    )
    return _scaled_grads(c, gh_nxHs, gw_head, hs_nxHs, ws_HsxV, spec) + (None,) * 7


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def gathered_fused_linear_divergence(hs_nxHs, ws_HsxV, ht_nxHt, wt_HtxV, mask_n, targets_n, weights_n, offset,
                                     limit, spec: DivergenceSpec, axis_name, gather_axes, group: int):
    """`slice_fused_linear_divergence` for a shard whose vocabulary slice serves the token rows of
    a group of `group` shards (mesh axes `gather_axes`, part of `axis_name`), which it gathers a
    chunk at a time (`_gathered_pass`). Arguments are this shard's own rows (targets: global ids;
    offset: the slice's first column); outputs and d/dh are the own rows' whole-row values and
    d/dh summed over the group's slices (the other vocabulary axes' shares are summed by
    shard_map's transpose), d/dW this slice's from all the group's rows."""
    return _gathered(hs_nxHs, ws_HsxV, ht_nxHt, wt_HtxV, mask_n, targets_n, weights_n, offset, limit, spec,
                     tuple(axis_name), tuple(gather_axes), group)


# ----------------------------------------------------------------------------- the student alone


def student_slice_stats(hs_nxHs, ws_HsxV, mask_n, targets_n, limit, spec: DivergenceSpec):
    """Running statistics of the student's distribution over these columns: (max, sum, centered
    sum, target logit (0 where the target is elsewhere or absent)), float32 [n] each; blocks
    without a kept row are skipped. limit: None (spec.valid_vocab) or an int32 scalar."""
    n, vocab = hs_nxHs.shape[0], ws_HsxV.shape[1]
    heads = _loop_heads(spec, ws_HsxV)
    r = fused_token_block(n, vocab, spec)
    order_B, count = active_blocks(mask_n, r)

    def block(k, outs):
        _, row0 = _clamped_start(order_B[k], r, n)
        z_RxV, _ = _project(hs_nxHs, heads.student, heads.student_major, row0, r, spec, limit)
        values = rows.side_partial(z_RxV)
        if targets_n is not None:
            values += (rows.target_logit(z_RxV, jax.lax.dynamic_slice_in_dim(targets_n, row0, r)),)
        return tuple(jax.lax.dynamic_update_slice(o_n, v_R, (row0,)) for o_n, v_R in zip(outs, values))

    outs = over_active_blocks(order_B, count, block, tuple(jnp.zeros((n,), jnp.float32) for _ in range(4)))
    return outs
