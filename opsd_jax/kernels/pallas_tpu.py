"""Mosaic TPU kernels (Pallas) for the divergence; TPU interpret mode on other backends.

Letters: N tokens, V vocabulary, H hidden width (Hs student, Ht teacher), R rows per token block,
C columns per vocabulary block.

Grid = (token blocks, vocabulary blocks). The statistics kernel walks the vocabulary axis
sequentially ("arbitrary") and keeps the online-logsumexp state in VMEM scratch, so a token
block's stats leave the chip once. The fused form projects each tile on the MXU inside the kernel
(h[R, H] @ W[H, C]) and never writes logits to HBM. Its backward recomputes tiles in two kernels,
one accumulating d/dh over vocabulary blocks and one accumulating d/dW over token blocks; that is
16 N H V FLOPs in all instead of the XLA path's 8, the price of never holding a full row on chip.

Vocabulary sizes that no block divides (Qwen3: 151,936 = 128 x 1187) use a cdiv grid; the columns
past V in the last block hold garbage, so they are masked to -inf (logits) and 0 (weights) before
use, and likewise rows past N.

Off TPU the kernels run in the TPU interpreter unless `interpret=False` asks for Mosaic, which is
how a CPU host compiles them ahead of time for a TPU topology.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from opsd_jax.kernels import pallas_common, rows
from opsd_jax.kernels.api import DivergenceSpec

TOKEN_BLOCK = 256
VOCAB_BLOCK = 2048
FUSED_VOCAB_BLOCK = 512
VMEM_LIMIT_BYTES = 64 * 2**20


def _blocks(n: int, vocab: int, spec: DivergenceSpec, projected: bool):
    """(R, C) obeying Mosaic's tiling: R a multiple of 8 or N, C a multiple of 128 or V."""
    r = spec.token_block or TOKEN_BLOCK
    r = n if r >= n else max(8, r // 8 * 8)
    c = spec.vocab_block or (FUSED_VOCAB_BLOCK if projected else VOCAB_BLOCK)
    c = vocab if c >= vocab else max(128, c // 128 * 128)
    return r, c


def _limit(spec: DivergenceSpec, vocab: int) -> int:
    return vocab if spec.valid_vocab is None else spec.valid_vocab


def _col(x_N):
    return x_N[:, None]


def _load_rows(ref):
    return ref[...][:, 0]


def _tiles(in_refs, i, j, r, c, n, limit, spec, projected):
    """Scaled float32 logits of one tile, student and teacher [R, C], plus the masked student
    operands (h [R, Hs], W [Hs, C]) when projected."""
    column_1xC = rows.columns(c, j * c)
    row_Rx1 = i * r + jax.lax.broadcasted_iota(jnp.int32, (r, 1), 0)
    col_ok_1xC = column_1xC < limit
    row_ok_Rx1 = row_Rx1 < n
    operands = None
    if projected:
        hs_ref, ws_ref, ht_ref, wt_ref = in_refs
        # Zero the garbage past N and V: it would otherwise poison the gradient products (0 * NaN).
        hs_RxH = jnp.where(row_ok_Rx1, hs_ref[...], 0)
        ws_HxC = jnp.where(col_ok_1xC, ws_ref[...], 0)
        raw_s = jnp.dot(hs_RxH, ws_HxC, preferred_element_type=jnp.float32)
        raw_t = jnp.dot(ht_ref[...], wt_ref[...], preferred_element_type=jnp.float32)
        operands = (hs_RxH, ws_HxC)
    else:
        raw_s, raw_t = in_refs[0][...], in_refs[1][...]

    def scaled(raw_RxC):
        z_RxC = raw_RxC.astype(jnp.float32)
        if spec.temperature != 1.0:
            z_RxC = z_RxC * (1.0 / spec.temperature)
        return jnp.where(col_ok_1xC, z_RxC, rows.NEG_INF)

    return scaled(raw_s), scaled(raw_t), operands, col_ok_1xC, row_ok_Rx1


def _stats_kernel(*refs, n_in, r, c, n, limit, spec, projected, with_targets):
    in_refs = refs[:n_in]
    rest = list(refs[n_in:])
    tgt_ref = rest.pop(0) if with_targets else None
    out_refs = [rest.pop(0) for _ in range(6)]
    tout_refs = [rest.pop(0) for _ in range(2)] if with_targets else []
    acc_refs = [rest.pop(0) for _ in range(8)]
    tacc_refs = rest
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for ref, v_R in zip(acc_refs, rows.online_init(r)):
            ref[...] = _col(v_R)
        for ref in tacc_refs:
            ref[...] = jnp.zeros_like(ref)

    zs_RxC, zt_RxC, _, _, _ = _tiles(in_refs, i, j, r, c, n, limit, spec, projected)
    stats = rows.online_fold(rows.OnlineStats(*(_load_rows(ref) for ref in acc_refs)), zs_RxC, zt_RxC)
    for ref, v_R in zip(acc_refs, stats):
        ref[...] = _col(v_R)
    if with_targets:
        tgt_R = _load_rows(tgt_ref)
        tacc_refs[0][...] += _col(rows.target_logit(zs_RxC, tgt_R, j * c))
        tacc_refs[1][...] += _col(rows.target_logit(zt_RxC, tgt_R, j * c))

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        final = rows.OnlineStats(*(_load_rows(ref) for ref in acc_refs))
        if rows.divergence_mode(spec.beta) == "jsd":
            # Divergence and aux come from the second pass; only normalizers and entropies are final.
            zero_R = jnp.zeros((r,), jnp.float32)
            done = rows.online_finish(final, spec.beta, zero_R, zero_R)
        else:
            done = rows.online_finish(final, spec.beta)
        for ref, v_R in zip(out_refs, done):
            ref[...] = _col(v_R)
        for ref, acc in zip(tout_refs, tacc_refs):
            ref[...] = acc[...]


def _jsd_kernel(*refs, n_in, r, c, n, limit, spec, projected):
    in_refs = refs[:n_in]
    log_zs_ref, log_zt_ref, kl_s_ref, kl_t_ref, acc_s_ref, acc_t_ref = refs[n_in:]
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_s_ref[...] = jnp.zeros_like(acc_s_ref)
        acc_t_ref[...] = jnp.zeros_like(acc_t_ref)

    zs_RxC, zt_RxC, _, _, _ = _tiles(in_refs, i, j, r, c, n, limit, spec, projected)
    kl_s_R, kl_t_R = rows.jsd_block_kls(zs_RxC, zt_RxC, _load_rows(log_zs_ref), _load_rows(log_zt_ref), spec.beta)
    acc_s_ref[...] += _col(kl_s_R)
    acc_t_ref[...] += _col(kl_t_R)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        kl_s_ref[...] = acc_s_ref[...]
        kl_t_ref[...] = acc_t_ref[...]


def _grad_tile(in_refs, vec_refs, i, j, r, c, n, limit, spec, projected):
    """Gradient of the raw student logits for one tile, float32 [R, C], zero outside the data."""
    zs_RxC, zt_RxC, operands, col_ok_1xC, row_ok_Rx1 = _tiles(in_refs, i, j, r, c, n, limit, spec, projected)
    log_zs, log_zt, aux, ent_s, keep, cot_d, cot_h, cot_lp, tgt = (_load_rows(ref) for ref in vec_refs)
    g_RxC = rows.student_grad_tile(zs_RxC, zt_RxC, log_zs, log_zt, aux, ent_s, spec.beta, cot_d, cot_h, cot_lp, tgt, j * c)
    ok_RxC = col_ok_1xC & row_ok_Rx1 & (_col(keep) > 0)
    return jnp.where(ok_RxC, g_RxC * (1.0 / spec.temperature), 0.0), operands


def _logits_grad_kernel(*refs, r, c, n, limit, spec):
    in_refs, vec_refs, out_ref = refs[:2], refs[2:11], refs[11]
    g_RxC, _ = _grad_tile(in_refs, vec_refs, pl.program_id(0), pl.program_id(1), r, c, n, limit, spec, False)
    out_ref[...] = g_RxC.astype(out_ref.dtype)


def _hidden_grad_kernel(*refs, r, c, n, limit, spec):
    in_refs, vec_refs, out_ref, acc_ref = refs[:4], refs[4:13], refs[13], refs[14]
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    g_RxC, (_, ws_HxC) = _grad_tile(in_refs, vec_refs, pl.program_id(0), j, r, c, n, limit, spec, True)
    acc_ref[...] += jax.lax.dot_general(
        g_RxC.astype(ws_HxC.dtype), ws_HxC, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        out_ref[...] = acc_ref[...]


def _head_grad_kernel(*refs, r, c, n, limit, spec):
    # Grid is (vocabulary, tokens) here: the head block stays resident while tokens stream by.
    in_refs, vec_refs, out_ref, acc_ref = refs[:4], refs[4:13], refs[13], refs[14]
    i = pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    g_RxC, (hs_RxH, _) = _grad_tile(in_refs, vec_refs, i, pl.program_id(0), r, c, n, limit, spec, True)
    acc_ref[...] += jax.lax.dot_general(
        hs_RxH, g_RxC.astype(hs_RxH.dtype), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        out_ref[...] = acc_ref[...]


def _in_specs(inputs, r, c, projected, tokens_first=True):
    """BlockSpecs for the matrix inputs; index maps take grid ids in grid order."""

    def ids(g):
        return (g[0], g[1]) if tokens_first else (g[1], g[0])

    if projected:
        hs, ws, ht, wt = inputs
        return [
            pl.BlockSpec((r, hs.shape[1]), lambda *g: (ids(g)[0], 0)),
            pl.BlockSpec((ws.shape[0], c), lambda *g: (0, ids(g)[1])),
            pl.BlockSpec((r, ht.shape[1]), lambda *g: (ids(g)[0], 0)),
            pl.BlockSpec((wt.shape[0], c), lambda *g: (0, ids(g)[1])),
        ]
    return [pl.BlockSpec((r, c), lambda *g: ids(g)) for _ in inputs]


def _vec_spec(r, tokens_first=True):
    return pl.BlockSpec((r, 1), (lambda *g: (g[0], 0)) if tokens_first else (lambda *g: (g[1], 0)))


def _call(kernel, out_shape, grid, in_specs, out_specs, scratch, semantics, spec, *args):
    """pallas_call through Mosaic, or through the TPU interpreter (see DivergenceSpec.interpret)."""
    interpret = spec.interpret if spec.interpret is not None else jax.default_backend() != "tpu"
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(*args)


def _shape(inputs, projected):
    if projected:
        return inputs[0].shape[0], inputs[1].shape[1]
    return inputs[0].shape


def row_stats(inputs, targets_N, spec: DivergenceSpec):
    projected = len(inputs) == 4
    n, vocab = _shape(inputs, projected)
    r, c = _blocks(n, vocab, spec, projected)
    limit = _limit(spec, vocab)
    grid = (pl.cdiv(n, r), pl.cdiv(vocab, c))
    with_targets = targets_N is not None
    vec = jax.ShapeDtypeStruct((n, 1), jnp.float32)
    in_specs = _in_specs(inputs, r, c, projected)
    args = list(inputs)
    if with_targets:
        in_specs.append(_vec_spec(r))
        args.append(_col(targets_N))
    n_out = 6 + 2 * with_targets
    kernel = functools.partial(
        _stats_kernel, n_in=len(inputs), r=r, c=c, n=n, limit=limit, spec=spec, projected=projected,
        with_targets=with_targets,
    )
    scratch = [pltpu.VMEM((r, 1), jnp.float32) for _ in range(8 + 2 * with_targets)]
    outs = _call(
        kernel, [vec] * n_out, grid, in_specs, [_vec_spec(r)] * n_out, scratch, ("parallel", "arbitrary"), spec, *args
    )
    outs = [o[:, 0] for o in outs]
    stats = rows.RowStats(*outs[:6])
    if rows.divergence_mode(spec.beta) == "jsd":
        kernel = functools.partial(
            _jsd_kernel, n_in=len(inputs), r=r, c=c, n=n, limit=limit, spec=spec, projected=projected
        )
        kl_s, kl_t = _call(
            kernel, [vec] * 2, grid, _in_specs(inputs, r, c, projected) + [_vec_spec(r)] * 2,
            [_vec_spec(r)] * 2, [pltpu.VMEM((r, 1), jnp.float32)] * 2, ("parallel", "arbitrary"), spec,
            *inputs, _col(stats.student_log_z_R), _col(stats.teacher_log_z_R),
        )
        stats = pallas_common.jsd_from_kls(stats, kl_s[:, 0], kl_t[:, 0], spec.beta)
    return stats, ((outs[6], outs[7]) if with_targets else None)


def _grad_vectors(stats: rows.RowStats, cots, targets_N, n):
    cot_d, cot_h, cot_lp = pallas_common.full_cotangents(cots, n)
    keep = ((cot_d != 0) | (cot_h != 0) | (cot_lp != 0)).astype(jnp.float32)
    tgt = jnp.full((n,), -1, jnp.int32) if targets_N is None else targets_N
    vectors = (stats.student_log_z_R, stats.teacher_log_z_R, stats.aux_R, stats.student_entropy_R, keep, cot_d, cot_h, cot_lp)
    return [_col(v) for v in vectors] + [_col(tgt)]


def logits_grad(s_NxV, t_NxV, stats, cots, targets_N, spec: DivergenceSpec):
    n, vocab = s_NxV.shape
    r, c = _blocks(n, vocab, spec, False)
    kernel = functools.partial(_logits_grad_kernel, r=r, c=c, n=n, limit=_limit(spec, vocab), spec=spec)
    grid = (pl.cdiv(n, r), pl.cdiv(vocab, c))
    return _call(
        kernel, jax.ShapeDtypeStruct((n, vocab), s_NxV.dtype), grid,
        _in_specs((s_NxV, t_NxV), r, c, False) + [_vec_spec(r)] * 9,
        pl.BlockSpec((r, c), lambda i, j: (i, j)), [], ("parallel", "parallel"), spec,
        s_NxV, t_NxV, *_grad_vectors(stats, cots, targets_N, n),
    )


def fused_grads(hs, ws, ht, wt, stats, cots, targets_N, spec: DivergenceSpec):
    inputs = (hs, ws, ht, wt)
    n, vocab = hs.shape[0], ws.shape[1]
    width = hs.shape[1]
    r, c = _blocks(n, vocab, spec, True)
    limit = _limit(spec, vocab)
    vectors = _grad_vectors(stats, cots, targets_N, n)
    token_blocks, vocab_blocks = pl.cdiv(n, r), pl.cdiv(vocab, c)
    gh = _call(
        functools.partial(_hidden_grad_kernel, r=r, c=c, n=n, limit=limit, spec=spec),
        jax.ShapeDtypeStruct((n, width), jnp.float32), (token_blocks, vocab_blocks),
        _in_specs(inputs, r, c, True) + [_vec_spec(r)] * 9,
        pl.BlockSpec((r, width), lambda i, j: (i, 0)), [pltpu.VMEM((r, width), jnp.float32)],
        ("parallel", "arbitrary"), spec, *inputs, *vectors,
    )
    gw = _call(
        functools.partial(_head_grad_kernel, r=r, c=c, n=n, limit=limit, spec=spec),
        jax.ShapeDtypeStruct((width, vocab), jnp.float32), (vocab_blocks, token_blocks),
        _in_specs(inputs, r, c, True, tokens_first=False) + [_vec_spec(r, tokens_first=False)] * 9,
        pl.BlockSpec((width, c), lambda j, i: (0, j)), [pltpu.VMEM((width, c), jnp.float32)],
        ("parallel", "arbitrary"), spec, *inputs, *vectors,
    )
    return gh, gw


divergence, fused_linear_divergence = pallas_common.make(pallas_common.Backend(row_stats, logits_grad, fused_grads))
