"""Mosaic TPU kernels (Pallas) for the divergence; TPU interpret mode on other backends.

Letters: N tokens, V vocabulary, H hidden width (Hs student, Ht teacher), R rows per token block,
C columns per vocabulary block.

Grid = (token blocks, vocabulary blocks). The statistics kernel walks the vocabulary axis
sequentially ("arbitrary") and keeps the online-logsumexp state in its output blocks (resident
while the vocabulary axis advances), so a token block's stats leave the chip once. It returns
the *running* statistics (rows.OnlineStats), not finished results, so a shard that holds only a
slice of the vocabulary can combine them with the other shards' (vocab_parallel.py); finishing
them is cheap [N] vector math outside the kernel. The fused form projects each tile on the MXU
inside the kernel (h[R, H] @ W[H, C], in the hidden state's dtype: a float32 master head is cast
tile by tile) and never writes logits to HBM.

Its backward is one kernel that recomputes each tile once and forms both products from it:
4 N H V FLOPs for the two projections and 4 for G W^T and h^T G, 12 N H V in all with the
statistics sweep (16 for the JSD, whose second pass needs both normalizers). Its grid is
(vocabulary blocks, token blocks): the d/dW block of a vocabulary block stays in VMEM while the
token blocks stream past, and each token block's d/dh rows are read from HBM, added to and written
back (manual DMA, double-buffered so the write of one step overlaps the next). On chips whose two
TensorCores form one device (v4, v5p) a leading "parallel" axis gives each core half of the
vocabulary blocks and its own d/dh partial, summed afterwards.

Which vocabulary columns count is a run-time int32 scalar (`limit`): the embedding's padding
rows, and for a vocabulary-parallel shard the slice's position in the whole vocabulary, are not
known when the kernel is traced inside a shard_map. Token blocks without a kept row are skipped:
per-block flags are scalar-prefetched, a skipped step computes nothing, and its index maps point
at the blocks the previous step already holds, so it moves no data either.

Vocabulary sizes that no block divides (Qwen3: 151,936 = 128 x 1187) use a cdiv grid; the columns
past V in the last block hold garbage, so they are masked to -inf (logits) and 0 (weights) before
use, and likewise rows past N. Ignored tokens' rows may hold NaN: they are selected away (`where`)
wherever a product could carry them into another token's or the head's gradient.

Block sizes come from tpu_vmem.choose_blocks: per kernel, per width and per TPU generation.

A head whose slice has a column count that is no multiple of 128 while H is (Qwen3's vocabulary over
tensor = 2, 4 or 8) is read as its transpose [V, H], the orientation XLA stores it in, and its
d/dW is written [V, H]: see `vocab_major` for the rule and why.

Every pallas_call carries a pl.CostEstimate (stats_cost, jsd_cost, grad_cost, logits_grad_cost),
so that XLA's cost_analysis(), the plan's FLOP column and XLA's scheduler see the kernels' work;
each kernel body is a step function on one tile that the estimate traces, so the count follows the
code.

Off TPU the kernels run in the TPU interpreter unless `interpret=False` asks for Mosaic, which is
how a CPU host compiles them ahead of time for a TPU topology.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from opsd_jax.kernels import pallas_common, rows, tpu_vmem, vocab_parallel
from opsd_jax.kernels.spec import DivergenceSpec

N_STATS = len(rows.OnlineStats._fields)
# Per-token float32 values the gradient kernel reads, packed as the columns of one [N, 8] array
# (one VMEM block instead of eight lane-padded ones).
GRAD_VECTORS = ("student_log_z", "teacher_log_z", "aux", "student_entropy", "keep", "cot_divergence",
                "cot_entropy", "cot_logprob")
# Scalar-prefetched operands of the statistics and gradient kernels: the column limit, and per
# token block its "holds a kept row" flag and the block its index maps read.
N_PREFETCH = 3


def _col(x_N):
    return x_N[:, None]


def _load_rows(ref):
    return ref[...][:, 0]


def _generation(spec: DivergenceSpec) -> str | None:
    if spec.tpu_generation is not None:
        return spec.tpu_generation
    if jax.default_backend() == "tpu":
        return tpu_vmem.generation_of(jax.devices()[0].device_kind)
    return None


def _operands(inputs) -> tpu_vmem.Operands:
    if len(inputs) == 4:
        hs, ws, ht, wt = inputs
        return tpu_vmem.Operands(True, hs.shape[1], ht.shape[1], hs.dtype.itemsize, ht.dtype.itemsize,
                                 ws.dtype.itemsize, wt.dtype.itemsize)
    return tpu_vmem.Operands(False, logits_bytes=max(x.dtype.itemsize for x in inputs))


def _shape(inputs):
    if len(inputs) == 4:
        return inputs[0].shape[0], inputs[1].shape[1]
    return inputs[0].shape


def _blocks(kernel: str, inputs, spec: DivergenceSpec):
    n, vocab = _shape(inputs)
    return tpu_vmem.choose_blocks(kernel, n, vocab, _operands(inputs), _generation(spec),
                                  spec.token_block, spec.vocab_block)


def _default_limit(spec: DivergenceSpec, vocab: int):
    """The whole vocabulary's column bound, int32 [1]."""
    return jnp.array([vocab if spec.valid_vocab is None else spec.valid_vocab], jnp.int32)


def block_tables(active_N, r: int):
    """(int32 [B] flags: token block b holds an active row; int32 [B] the block b's index maps
    read: b itself when active, else the last active block before it (the first active one when
    none is), so that a skipped step finds its blocks already in VMEM)."""
    n = active_N.shape[0]
    count = pl.cdiv(n, r)
    padded = jnp.zeros((count * r,), jnp.bool_).at[:n].set(active_N)
    flags_B = jnp.any(padded.reshape(count, r), axis=1)
    index_B = jnp.arange(count, dtype=jnp.int32)
    last_B = jax.lax.cummax(jnp.where(flags_B, index_B, -1))
    first = jnp.argmax(flags_B).astype(jnp.int32)
    return flags_B.astype(jnp.int32), jnp.where(last_B >= 0, last_B, first).astype(jnp.int32)


# Which heads the kernels read vocabulary-major, and why: tpu_vmem.vocab_major.
vocab_major = tpu_vmem.vocab_major


def _orientation(inputs, spec: DivergenceSpec) -> tuple[bool, bool]:
    """(student head vocabulary-major, teacher head vocabulary-major) of hidden-major inputs;
    (False, False) for logits."""
    if len(inputs) != 4:
        return (False, False)
    hs, ws, ht, wt = inputs
    shards = spec.head_hidden_shards
    return vocab_major(hs.shape[1], ws.shape[1], shards), vocab_major(ht.shape[1], wt.shape[1], shards)


def _oriented(inputs, major):
    """The inputs as the kernels read them: each vocabulary-major head transposed to [v, H]."""
    if len(inputs) != 4:
        return tuple(inputs)
    hs, ws, ht, wt = inputs
    return hs, ws.T if major[0] else ws, ht, wt.T if major[1] else wt


def _project(h_RxH, w, vocab_major_=False):
    """float32 [R, C] = h @ W on the MXU in h's dtype (the model's compute dtype, as
    models.logits_from_hidden multiplies); w: an [H, C] head tile, or [C, H] when vocab_major_."""
    contract = 1 if vocab_major_ else 0
    return jax.lax.dot_general(h_RxH, w.astype(h_RxH.dtype), (((1,), (contract,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _tile_values(limit, blocks, column0, c, spec, projected, major=(False, False)):
    """Scaled float32 logits of one tile, student and teacher [R, C] (-inf at columns past the
    limit, garbage included), and that column mask [1, C]. blocks: the input blocks (hidden rows
    and head tiles, or two logits tiles) as refs in the kernel, values when the cost is traced,
    read with [...] where used (a head tile loaded early would stay live in VMEM); column0: the
    tile's first vocabulary column; major: _orientation of the heads."""
    col_ok_1xC = rows.columns(c, column0) < limit
    if projected:
        hs, ws, ht, wt = blocks
        raw_s, raw_t = _project(hs[...], ws[...], major[0]), _project(ht[...], wt[...], major[1])
    else:
        raw_s, raw_t = blocks[0][...], blocks[1][...]

    def scaled(raw_RxC):
        z_RxC = raw_RxC.astype(jnp.float32)
        if spec.temperature != 1.0:
            z_RxC = z_RxC * (1.0 / spec.temperature)
        return jnp.where(col_ok_1xC, z_RxC, rows.NEG_INF)

    return scaled(raw_s), scaled(raw_t), col_ok_1xC


def _stats_step(limit, blocks, old: rows.OnlineStats, tgt_R, column0, *, c, spec, projected, major=(False, False)):
    """One (token block, vocabulary block) step of the statistics kernel (see _tile_values): (the
    folded statistics, the two targets' logits in this tile, or () without targets)."""
    zs_RxC, zt_RxC, _ = _tile_values(limit, blocks, column0, c, spec, projected, major)
    new = rows.online_fold(old, zs_RxC, zt_RxC, spec.beta)
    if tgt_R is None:
        return new, ()
    return new, (rows.target_logit(zs_RxC, tgt_R, column0), rows.target_logit(zt_RxC, tgt_R, column0))


def _jsd_step(limit, blocks, log_zs_R, log_zt_R, column0, *, c, spec, projected, major=(False, False)):
    """One step of the JSD second pass: this tile's shares of KL(p_s||m), KL(p_t||m) [R]."""
    zs_RxC, zt_RxC, _ = _tile_values(limit, blocks, column0, c, spec, projected, major)
    return rows.jsd_block_kls(zs_RxC, zt_RxC, log_zs_R, log_zt_R, spec.beta)


def _stats_kernel(limit_ref, flags_ref, index_ref, *refs, n_in, c, spec, projected, major, with_targets):
    del index_ref  # used by the index maps only
    in_refs = refs[:n_in]
    rest = list(refs[n_in:])
    tgt_ref = rest.pop(0) if with_targets else None
    stat_refs = rest[:N_STATS]
    target_refs = rest[N_STATS:]
    i, j = pl.program_id(0), pl.program_id(1)

    # The output blocks stay in VMEM while j advances (same block index): they are the accumulators.
    @pl.when(j == 0)
    def _init():
        for ref, v_R in zip(stat_refs, rows.online_init(stat_refs[0].shape[0])):
            ref[...] = _col(v_R)
        for ref in target_refs:
            ref[...] = jnp.zeros_like(ref)

    @pl.when(flags_ref[i] > 0)
    def _fold():
        old = rows.OnlineStats(*(_load_rows(ref) for ref in stat_refs))
        tgt_R = _load_rows(tgt_ref) if with_targets else None
        new, target_logits = _stats_step(limit_ref[0], in_refs, old, tgt_R, j * c, c=c,
                                         spec=spec, projected=projected, major=major)
        for ref, v_R in zip(stat_refs, new):
            ref[...] = _col(v_R)
        for ref, v_R in zip(target_refs, target_logits):
            ref[...] += _col(v_R)


def _jsd_kernel(limit_ref, flags_ref, index_ref, *refs, n_in, c, spec, projected, major):
    del index_ref
    in_refs = refs[:n_in]
    log_zs_ref, log_zt_ref, kl_s_ref, kl_t_ref = refs[n_in:]
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        kl_s_ref[...] = jnp.zeros_like(kl_s_ref)
        kl_t_ref[...] = jnp.zeros_like(kl_t_ref)

    @pl.when(flags_ref[i] > 0)
    def _add():
        kl_s_R, kl_t_R = _jsd_step(limit_ref[0], in_refs, _load_rows(log_zs_ref),
                                   _load_rows(log_zt_ref), j * c, c=c, spec=spec, projected=projected,
                                   major=major)
        kl_s_ref[...] += _col(kl_s_R)
        kl_t_ref[...] += _col(kl_t_R)


def _grad_tile(limit, blocks, v_RxK, tgt_R, row0, column0, r, c, n, spec, projected, major=(False, False)):
    """(gradient of the raw student logits float32 [R, C], zero outside the data and for ignored
    tokens; the rows that count [R, 1]; the columns that count [1, C]). blocks: see _tile_values;
    v_RxK: the packed GRAD_VECTORS; row0 / column0 the tile's first token and vocabulary column."""
    zs_RxC, zt_RxC, col_ok_1xC = _tile_values(limit, blocks, column0, c, spec, projected, major)
    log_zs, log_zt, aux, ent_s, keep, cot_d, cot_h, cot_lp = (v_RxK[:, k] for k in range(len(GRAD_VECTORS)))
    g_RxC = rows.student_grad_tile(
        zs_RxC, zt_RxC, log_zs, log_zt, aux, ent_s, spec.beta, cot_d, cot_h, cot_lp, tgt_R, column0
    )
    row_ok_Rx1 = (row0 + jax.lax.broadcasted_iota(jnp.int32, (r, 1), 0) < n) & (_col(keep) > 0)
    return jnp.where(col_ok_1xC & row_ok_Rx1, g_RxC * (1.0 / spec.temperature), 0.0), row_ok_Rx1, col_ok_1xC


def _logits_grad_kernel(limit_ref, s_ref, t_ref, vec_ref, tgt_ref, out_ref, *, r, c, n, spec):
    i, j = pl.program_id(0), pl.program_id(1)
    g_RxC, _, _ = _grad_tile(limit_ref[0], (s_ref, t_ref), vec_ref[...], _load_rows(tgt_ref), i * r,
                             j * c, r, c, n, spec, False)
    out_ref[...] = g_RxC.astype(out_ref.dtype)


def _grad_step(limit, blocks, v_RxK, tgt_R, row0, column0, *, r, c, n, spec, major=(False, False)):
    """One (vocabulary block, token block) step of the gradient kernel (blocks: see
    _tile_values): (this tile's h^T G float32 [Hs, C], or G^T h [C, Hs] when the student head is
    vocabulary-major (d/dW in the head's orientation); its G W^T float32 [R, Hs])."""
    g_RxC, row_ok_Rx1, col_ok_1xC = _grad_tile(limit, blocks, v_RxK, tgt_R, row0, column0, r, c, n, spec, True,
                                               major)
    hs_dtype = blocks[0].dtype
    g_RxC = g_RxC.astype(hs_dtype)
    # Rows past N are garbage and ignored tokens may be NaN: g's zeros would not cancel them.
    hs_RxH = jnp.where(row_ok_Rx1, blocks[0][...], 0)
    if major[0]:
        gw = jax.lax.dot_general(g_RxC, hs_RxH, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        # Likewise the garbage columns past V in the head tile (its rows here).
        col_ok_Cx1 = column0 + jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0) < limit
        ws_CxH = jnp.where(col_ok_Cx1, blocks[1][...].astype(hs_dtype), 0)
        gh_RxH = jnp.dot(g_RxC, ws_CxH, preferred_element_type=jnp.float32)
        return gw, gh_RxH
    gw = jax.lax.dot_general(hs_RxH, g_RxC, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    ws_HxC = jnp.where(col_ok_1xC, blocks[1][...].astype(hs_dtype), 0)
    gh_RxH = jax.lax.dot_general(g_RxC, ws_HxC, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return gw, gh_RxH


def _grad_kernel(limit_ref, flags_ref, index_ref, *refs, r, c, n, n_token_blocks, vocab_blocks, per_core, spec,
                 major):
    """One step (core, jj, i): token block i against vocabulary block j = core * per_core + jj.

    gw_ref: the [Hs, C] ([C, Hs] vocabulary-major) d/dW block of j, resident while i advances. gh_hbm: [cores, Npad, Hs]
    float32 in HBM; buf: two [R, Hs] float32 VMEM buffers; step s = jj * I + i of this core uses
    buf[s % 2]: it reads token block i's partial d/dh (written back by the step I earlier, whose
    write was awaited before this step), adds G W^T, and starts the write back, which the next
    step awaits. With a single token block the rows stay in buf[0] instead and leave once.
    """
    del index_ref
    in_refs, vec_ref, tgt_ref, gw_ref, gh_hbm, buf, in_sem, out_sem = (refs[:4], *refs[4:])
    core, jj, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    j = core * per_core + jj
    live = j < vocab_blocks
    kept = (flags_ref[i] > 0) & live
    single = n_token_blocks == 1
    step = jj * n_token_blocks + i
    slot = 0 if single else step % 2
    last = (jj == per_core - 1) & (i == n_token_blocks - 1)

    def rows_of(block):
        return pl.ds(pl.multiple_of(block * r, 8), r)

    def read(block, at):
        return pltpu.make_async_copy(gh_hbm.at[core, rows_of(block), :], buf.at[at], in_sem)

    def write(block, at):
        return pltpu.make_async_copy(buf.at[at], gh_hbm.at[core, rows_of(block), :], out_sem.at[at])

    @pl.when((i == 0) & live)
    def _init():
        gw_ref[...] = jnp.zeros_like(gw_ref)

    if not single:
        @pl.when(kept & (jj > 0))
        def _fetch():
            read(i, slot).start()

    @pl.when(kept)
    def _accumulate():
        gw, gh_RxH = _grad_step(limit_ref[0], in_refs, vec_ref[...], _load_rows(tgt_ref),
                                i * r, j * c, r=r, c=c, n=n, spec=spec, major=major)
        gw_ref[...] += gw

        @pl.when(jj == 0)
        def _first():
            buf[slot] = gh_RxH

        @pl.when(jj > 0)
        def _add():
            if not single:
                read(i, slot).wait()
            buf[slot] += gh_RxH

    if single:
        @pl.when(last & (flags_ref[0] > 0))
        def _flush():
            write(0, 0).start()
            write(0, 0).wait()
    else:
        previous = jnp.where(i == 0, n_token_blocks - 1, i - 1)
        previous_live = jnp.where(i == 0, j - 1, j) < vocab_blocks

        @pl.when((step > 0) & (flags_ref[previous] > 0) & previous_live)
        def _drain():
            write(previous, 1 - slot).wait()

        @pl.when(kept)
        def _store():
            write(i, slot).start()

        @pl.when(kept & last)
        def _finish():
            write(i, slot).wait()


def _in_specs(inputs, r, c, tokens_first=True):
    """BlockSpecs for the matrix inputs (no scalar prefetch); index maps take grid ids in order."""

    def ids(g):
        return (g[0], g[1]) if tokens_first else (g[1], g[0])

    if len(inputs) == 4:
        hs, ws, ht, wt = inputs
        return [
            pl.BlockSpec((r, hs.shape[1]), lambda *g: (ids(g)[0], 0)),
            pl.BlockSpec((ws.shape[0], c), lambda *g: (0, ids(g)[1])),
            pl.BlockSpec((r, ht.shape[1]), lambda *g: (ids(g)[0], 0)),
            pl.BlockSpec((wt.shape[0], c), lambda *g: (0, ids(g)[1])),
        ]
    return [pl.BlockSpec((r, c), lambda *g: ids(g)) for _ in inputs]


def _head_spec(width, c, vocab_major_, vocab_index, **kw):
    """The BlockSpec of one head's tiles: [H, C] blocks, or [C, H] of a vocabulary-major head;
    vocab_index maps the grid ids to the vocabulary block."""
    if vocab_major_:
        return pl.BlockSpec((c, width), lambda *g: (vocab_index(*g), 0), **kw)
    return pl.BlockSpec((width, c), lambda *g: (0, vocab_index(*g)), **kw)


def _skipping_in_specs(inputs, r, c, vocab_blocks, major=(False, False)):
    """BlockSpecs of the matrix inputs (hidden-major shapes; major: _orientation) for a (token
    block i, vocab block j) grid with scalar prefetch (limit, flags, index): a skipped block reads
    token block index[i] and vocabulary block V/C - 1, which the previous step already holds."""

    def token(i, flags, index):
        return index[i]

    def vocab(i, j, flags):
        return jnp.where(flags[i] > 0, j, vocab_blocks - 1)

    if len(inputs) == 4:
        hs, ws, ht, wt = inputs
        # The hidden rows change once per token block: one buffer (tpu_vmem.estimate).
        return [
            pl.BlockSpec((r, hs.shape[1]), lambda i, j, lim, f, x: (token(i, f, x), 0), pipeline_mode=pl.Buffered(1)),
            _head_spec(ws.shape[0], c, major[0], lambda i, j, lim, f, x: vocab(i, j, f)),
            pl.BlockSpec((r, ht.shape[1]), lambda i, j, lim, f, x: (token(i, f, x), 0), pipeline_mode=pl.Buffered(1)),
            _head_spec(wt.shape[0], c, major[1], lambda i, j, lim, f, x: vocab(i, j, f)),
        ]
    return [pl.BlockSpec((r, c), lambda i, j, lim, f, x: (token(i, f, x), vocab(i, j, f))) for _ in inputs]


def _row_spec(r, width=1, *, follow=True):
    """An [R, width] block of token block i (grid (i, j) with scalar prefetch); follow: a skipped
    block reads the block its index table names (inputs) rather than its own (outputs)."""
    if follow:
        return pl.BlockSpec((r, width), lambda i, j, lim, f, x: (x[i], 0))
    return pl.BlockSpec((r, width), lambda i, j, lim, f, x: (i, 0))


def _vec_spec(r, width=1, tokens_first=True):
    return pl.BlockSpec((r, width), (lambda *g: (g[0], 0)) if tokens_first else (lambda *g: (g[1], 0)))


_SMEM = pl.BlockSpec(memory_space=pltpu.SMEM)


def _interpret(spec: DivergenceSpec):
    interpret = spec.interpret if spec.interpret is not None else jax.default_backend() != "tpu"
    return pltpu.InterpretParams() if interpret else False


def _params(semantics, spec):
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=tpu_vmem.budget(_generation(spec)).limit_bytes)


def _call(kernel, out_shape, grid, in_specs, out_specs, semantics, spec, cost, *args):
    """pallas_call through Mosaic, or through the TPU interpreter (see DivergenceSpec.interpret)."""
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=_params(semantics, spec), interpret=_interpret(spec), cost_estimate=cost,
    )(*args)


def _call_prefetch(kernel, out_shape, grid, in_specs, out_specs, semantics, spec, cost, prefetch, *args, scratch=()):
    """pallas_call with N_PREFETCH scalar-prefetched int32 arrays (limit, flags, index)."""
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=N_PREFETCH, grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=list(scratch),
    )
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid_spec=grid_spec, compiler_params=_params(semantics, spec),
        interpret=_interpret(spec), cost_estimate=cost,
    )(*prefetch, *args)


# Cost estimates. A Mosaic kernel is opaque to XLA: without a pl.CostEstimate its FLOPs count as 0
# in cost_analysis() (and in XLA's scheduling). Each estimate traces the very step function the
# kernel runs on one (R, C) tile (pl.estimate_cost: 2 R H C per matmul, one FLOP per arithmetic
# elementwise op, exp / log as transcendentals; selects and reductions are not counted) and
# multiplies by the grid steps that compute. That counts
# every token block as kept (which blocks are skipped is only known at run time: the estimate is
# the dense upper bound) and the last vocabulary block in full (its columns past V are computed and
# masked). Bytes follow the BlockSpecs: a block is read again only when its index changes between
# consecutive steps.


# XLA's cost model, which pl.estimate_cost runs, counts exp and log as transcendentals but not
# log1p or expm1 (it gives them 0); the JSD's log-ratios use log1p per entry.
_UNCOUNTED_TRANSCENDENTALS = frozenset({"log1p", "expm1"})


def sub_jaxprs(eqn):
    """The jaxprs an equation runs (loop bodies, branches, called functions)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def _uncounted_transcendentals(jaxpr) -> int:
    """Elements produced by the primitives in _UNCOUNTED_TRANSCENDENTALS, nested jaxprs included."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _UNCOUNTED_TRANSCENDENTALS:
            count += sum(math.prod(v.aval.shape) for v in eqn.outvars)
        count += sum(_uncounted_transcendentals(sub) for sub in sub_jaxprs(eqn))
    return count


def _step_cost(step_fn, *args) -> pl.CostEstimate:
    """pl.estimate_cost of one grid step, with the transcendentals XLA's cost model leaves out."""
    cost = pl.estimate_cost(step_fn, *args)
    missing = _uncounted_transcendentals(jax.make_jaxpr(step_fn)(*args).jaxpr)
    return pl.CostEstimate(flops=cost.flops, transcendentals=cost.transcendentals + missing,
                           bytes_accessed=cost.bytes_accessed)


def _scalar():
    return jax.ShapeDtypeStruct((), jnp.int32)


def _vector(r, dtype=jnp.float32):
    return jax.ShapeDtypeStruct((r,), dtype)


def _block_values(inputs, r, c, major=(False, False)):
    """Abstract [R, H] / [H, C] ([C, H] vocabulary-major) (or [R, C] logits) blocks of the matrix
    inputs (hidden-major shapes)."""
    if len(inputs) == 4:
        hs, ws, ht, wt = inputs

        def head(w, vocab_major_):
            return jax.ShapeDtypeStruct((c, w.shape[0]) if vocab_major_ else (w.shape[0], c), w.dtype)

        return [jax.ShapeDtypeStruct((r, hs.shape[1]), hs.dtype), head(ws, major[0]),
                jax.ShapeDtypeStruct((r, ht.shape[1]), ht.dtype), head(wt, major[1])]
    return [jax.ShapeDtypeStruct((r, c), x.dtype) for x in inputs]


def _nbytes(x):
    return x.size * x.dtype.itemsize


def _streamed_bytes(inputs, token_blocks, vocab_blocks):
    """HBM bytes of the matrix inputs on a (token block, vocabulary block) grid: hidden rows once,
    heads once per token block (once in all when one vocabulary block never changes index), logits
    tiles once each."""
    if len(inputs) == 4:
        hs, ws, ht, wt = inputs
        head_reads = token_blocks if vocab_blocks > 1 else 1
        return _nbytes(hs) + _nbytes(ht) + head_reads * (_nbytes(ws) + _nbytes(wt))
    return sum(_nbytes(x) for x in inputs)


def _estimate(step_cost, steps, *, extra_flops=0, bytes_accessed):
    return pl.CostEstimate(flops=int(steps * step_cost.flops + extra_flops),
                           transcendentals=int(steps * step_cost.transcendentals),
                           bytes_accessed=int(bytes_accessed))


def stats_cost(inputs, with_targets: bool, r, c, spec: DivergenceSpec, major=(False, False)) -> pl.CostEstimate:
    """The statistics kernel's pl.CostEstimate on (R, C) blocks (see the note on cost estimates);
    inputs hidden-major, major: which heads the kernel reads vocabulary-major."""
    n, vocab = _shape(inputs)
    token_blocks, vocab_blocks = pl.cdiv(n, r), pl.cdiv(vocab, c)
    old = rows.OnlineStats(*(_vector(r) for _ in range(N_STATS)))
    tgt = _vector(r, jnp.int32) if with_targets else None
    step = _step_cost(functools.partial(_stats_step, c=c, spec=spec, projected=len(inputs) == 4, major=major),
                      _scalar(), _block_values(inputs, r, c, major), old, tgt, _scalar())
    # targets read; the statistics and the two target logits written
    vectors = (with_targets + N_STATS + 2 * with_targets) * n * 4
    return _estimate(step, token_blocks * vocab_blocks,
                     bytes_accessed=_streamed_bytes(inputs, token_blocks, vocab_blocks) + vectors)


def jsd_cost(inputs, r, c, spec: DivergenceSpec, major=(False, False)) -> pl.CostEstimate:
    """The JSD second pass's pl.CostEstimate on (R, C) blocks."""
    n, vocab = _shape(inputs)
    token_blocks, vocab_blocks = pl.cdiv(n, r), pl.cdiv(vocab, c)
    step = _step_cost(functools.partial(_jsd_step, c=c, spec=spec, projected=len(inputs) == 4, major=major),
                      _scalar(), _block_values(inputs, r, c, major), _vector(r), _vector(r), _scalar())
    return _estimate(step, token_blocks * vocab_blocks,
                     bytes_accessed=_streamed_bytes(inputs, token_blocks, vocab_blocks) + 4 * n * 4)


def logits_grad_cost(s_NxV, t_NxV, r, c, spec: DivergenceSpec) -> pl.CostEstimate:
    """The logits-gradient kernel's pl.CostEstimate on (R, C) blocks."""
    n, vocab = s_NxV.shape
    step = _step_cost(
        lambda limit, blocks, v, tgt, row0, column0: _grad_tile(limit, blocks, v, tgt, row0, column0, r, c, n, spec,
                                                                False)[0],
        _scalar(), _block_values((s_NxV, t_NxV), r, c), jax.ShapeDtypeStruct((r, len(GRAD_VECTORS)), jnp.float32),
        _vector(r, jnp.int32), _scalar(), _scalar())
    # the two logits read, the gradient written; per-token values once per token block
    moved = 3 * _nbytes(s_NxV) + (len(GRAD_VECTORS) + 1) * n * 4
    return _estimate(step, pl.cdiv(n, r) * pl.cdiv(vocab, c), bytes_accessed=moved)


def grad_cost(inputs, r, c, cores, per_core, spec: DivergenceSpec, major=(False, False)) -> pl.CostEstimate:
    """The gradient kernel's pl.CostEstimate: grid (cores, per_core, token blocks), of which the
    steps of vocabulary blocks past the last (the second core's tail) compute nothing."""
    hs, ws, ht, wt = inputs
    n, width, vocab = hs.shape[0], hs.shape[1], ws.shape[1]
    token_blocks, vocab_blocks = pl.cdiv(n, r), pl.cdiv(vocab, c)
    step = _step_cost(functools.partial(_grad_step, r=r, c=c, n=n, spec=spec, major=major), _scalar(),
                      _block_values(inputs, r, c, major), jax.ShapeDtypeStruct((r, len(GRAD_VECTORS)), jnp.float32),
                      _vector(r, jnp.int32), _scalar(), _scalar())
    steps = token_blocks * vocab_blocks
    # gw += h^T G and buf += G W^T, outside the step function
    accumulate = steps * (width * c + r * width)
    # Per-token blocks (hidden rows, packed values, targets) change every step, unless there is one
    # token block: then each core's pipeline fetches them once.
    row_passes = cores * per_core if token_blocks > 1 else cores
    per_token = _nbytes(hs) + _nbytes(ht) + n * (len(GRAD_VECTORS) + 1) * 4
    # Each vocabulary block writes its d/dh rows back, and reads them first unless it is its core's
    # first; with one token block each core writes its rows once.
    dh_rows = token_blocks * r * width * 4
    used_cores = pl.cdiv(vocab_blocks, per_core)
    dh_moved = used_cores * dh_rows if token_blocks == 1 else (2 * vocab_blocks - used_cores) * dh_rows
    moved = row_passes * per_token + _nbytes(ws) + _nbytes(wt) + width * vocab * 4 + dh_moved
    return _estimate(step, steps, extra_flops=accumulate, bytes_accessed=moved)


def slice_stats(inputs, targets_N, mask_N, limit, spec: DivergenceSpec):
    """vocab_parallel.LocalBackend.stats: running statistics (rows.OnlineStats, float32 [N]) of
    these columns, and the targets' scaled logits (0 where a target lies outside them) or None.

    inputs: (logits s, t [N, V]) or (hs [N, Hs], ws [Hs, V], ht [N, Ht], wt [Ht, V]); targets_N:
    int32 column ids or None; mask_N: bool, token blocks without a kept row are skipped (their
    rows' statistics stay at their initial values); limit: int32 [1], columns at or past it are
    excluded.
    """
    projected = len(inputs) == 4
    n, vocab = _shape(inputs)
    r, c = _blocks("stats", inputs, spec)
    with_targets = targets_N is not None
    vec = jax.ShapeDtypeStruct((n, 1), jnp.float32)
    vocab_blocks = pl.cdiv(vocab, c)
    major = _orientation(inputs, spec)
    in_specs = _skipping_in_specs(inputs, r, c, vocab_blocks, major)
    args = list(_oriented(inputs, major))
    if with_targets:
        in_specs.append(_row_spec(r))
        args.append(_col(targets_N))
    n_out = N_STATS + 2 * with_targets
    kernel = functools.partial(_stats_kernel, n_in=len(inputs), c=c, spec=spec, projected=projected, major=major,
                               with_targets=with_targets)
    prefetch = (jnp.reshape(limit, (1,)).astype(jnp.int32), *block_tables(mask_N, r))
    outs = _call_prefetch(kernel, [vec] * n_out, (pl.cdiv(n, r), vocab_blocks), in_specs,
                          [_row_spec(r, follow=False)] * n_out, ("parallel", "arbitrary"), spec,
                          stats_cost(inputs, with_targets, r, c, spec, major), prefetch, *args)
    outs = [o[:, 0] for o in outs]
    return rows.OnlineStats(*outs[:N_STATS]), (tuple(outs[N_STATS:]) if with_targets else None)


def slice_jsd_kls(inputs, log_zs_N, log_zt_N, mask_N, limit, spec: DivergenceSpec):
    """vocab_parallel.LocalBackend.jsd_kls: these columns' shares of KL(p_s||m), KL(p_t||m) [N]."""
    projected = len(inputs) == 4
    n, vocab = _shape(inputs)
    r, c = _blocks("jsd", inputs, spec)
    vec = jax.ShapeDtypeStruct((n, 1), jnp.float32)
    vocab_blocks = pl.cdiv(vocab, c)
    major = _orientation(inputs, spec)
    kernel = functools.partial(_jsd_kernel, n_in=len(inputs), c=c, spec=spec, projected=projected, major=major)
    prefetch = (jnp.reshape(limit, (1,)).astype(jnp.int32), *block_tables(mask_N, r))
    kl_s, kl_t = _call_prefetch(
        kernel, [vec] * 2, (pl.cdiv(n, r), vocab_blocks),
        _skipping_in_specs(inputs, r, c, vocab_blocks, major) + [_row_spec(r)] * 2, [_row_spec(r, follow=False)] * 2,
        ("parallel", "arbitrary"), spec, jsd_cost(inputs, r, c, spec, major), prefetch, *_oriented(inputs, major),
        _col(log_zs_N), _col(log_zt_N),
    )
    return kl_s[:, 0], kl_t[:, 0]


def row_stats(inputs, targets_N, mask_N, spec: DivergenceSpec):
    """pallas_common.Backend.row_stats: the whole vocabulary is one slice."""
    local = vocab_parallel.LocalBackend(slice_stats, slice_jsd_kls, None)
    return vocab_parallel.combined_row_stats(local, inputs, targets_N, mask_N,
                                             _default_limit(spec, _shape(inputs)[1]), spec)


def _grad_vectors(stats: rows.RowStats, cots, targets_N, n):
    """(float32 [N, 8] packed GRAD_VECTORS, int32 [N, 1] targets (-1: none), bool [N] keep)."""
    cot_d, cot_h, cot_lp = pallas_common.full_cotangents(cots, n)
    keep_N = (cot_d != 0) | (cot_h != 0) | (cot_lp != 0)
    packed = jnp.stack(
        [stats.student_log_z_R, stats.teacher_log_z_R, stats.aux_R, stats.student_entropy_R,
         keep_N.astype(jnp.float32), cot_d, cot_h, cot_lp],
        axis=1,
    )
    tgt = jnp.full((n,), -1, jnp.int32) if targets_N is None else targets_N
    return packed, _col(tgt), keep_N


def logits_grad(s_NxV, t_NxV, stats, cots, targets_N, spec: DivergenceSpec):
    n, vocab = s_NxV.shape
    r, c = _blocks("logits_grad", (s_NxV, t_NxV), spec)
    kernel = functools.partial(_logits_grad_kernel, r=r, c=c, n=n, spec=spec)
    packed, tgt, _ = _grad_vectors(stats, cots, targets_N, n)
    return _call(
        kernel, jax.ShapeDtypeStruct((n, vocab), s_NxV.dtype), (pl.cdiv(n, r), pl.cdiv(vocab, c)),
        [_SMEM] + _in_specs((s_NxV, t_NxV), r, c) + [_vec_spec(r, len(GRAD_VECTORS)), _vec_spec(r)],
        pl.BlockSpec((r, c), lambda i, j: (i, j)), ("parallel", "parallel"), spec,
        logits_grad_cost(s_NxV, t_NxV, r, c, spec), _default_limit(spec, vocab), s_NxV, t_NxV, packed, tgt,
    )


def slice_grads(hs, ws, ht, wt, stats, cots, targets_N, limit, spec: DivergenceSpec):
    """vocab_parallel.LocalBackend.grads: (float32 [N, Hs] d/dh through these columns, float32
    [Hs, V] d/dW of these columns), one recomputation of each tile (`_grad_kernel`). A
    vocabulary-major student head gets d/dW as the transpose of the kernel's [V, Hs] (a bitcast
    where XLA stores it column-major, see `vocab_major`)."""
    inputs = (hs, ws, ht, wt)
    major = _orientation(inputs, spec)
    n, vocab = hs.shape[0], ws.shape[1]
    width = hs.shape[1]
    packed, tgt, keep_N = _grad_vectors(stats, cots, targets_N, n)
    r, c = _blocks("grad", inputs, spec)
    token_blocks, vocab_blocks = pl.cdiv(n, r), pl.cdiv(vocab, c)
    cores = min(tpu_vmem.cores_per_device(_generation(spec)), vocab_blocks)
    per_core = pl.cdiv(vocab_blocks, cores)

    def vocab_index(core, jj):
        return jnp.minimum(core * per_core + jj, vocab_blocks - 1)

    def token(i, index):
        return index[i]

    # Head tiles and the d/dW block change once per vocabulary block: one buffer each.
    once = pl.Buffered(1)
    def head_block(k, jj, i, lim, f, x):
        return vocab_index(k, jj)

    in_specs = [
        pl.BlockSpec((r, width), lambda k, jj, i, lim, f, x: (token(i, x), 0)),
        _head_spec(width, c, major[0], head_block, pipeline_mode=once),
        pl.BlockSpec((r, ht.shape[1]), lambda k, jj, i, lim, f, x: (token(i, x), 0)),
        _head_spec(wt.shape[0], c, major[1], head_block, pipeline_mode=once),
        pl.BlockSpec((r, len(GRAD_VECTORS)), lambda k, jj, i, lim, f, x: (token(i, x), 0)),
        pl.BlockSpec((r, 1), lambda k, jj, i, lim, f, x: (token(i, x), 0)),
    ]
    out_specs = [
        _head_spec(width, c, major[0], head_block, pipeline_mode=once),
        pl.BlockSpec(memory_space=pl.ANY),
    ]
    out_shape = [jax.ShapeDtypeStruct((vocab, width) if major[0] else (width, vocab), jnp.float32),
                 jax.ShapeDtypeStruct((cores, token_blocks * r, width), jnp.float32)]
    scratch = (pltpu.VMEM((2, r, width), jnp.float32), pltpu.SemaphoreType.DMA(()), pltpu.SemaphoreType.DMA((2,)))
    kernel = functools.partial(_grad_kernel, r=r, c=c, n=n, n_token_blocks=token_blocks, vocab_blocks=vocab_blocks,
                               per_core=per_core, spec=spec, major=major)
    prefetch = (jnp.reshape(limit, (1,)).astype(jnp.int32), *block_tables(keep_N, r))
    gw, gh_parts = _call_prefetch(kernel, out_shape, (cores, per_core, token_blocks), in_specs, out_specs,
                                  ("parallel", "arbitrary", "arbitrary"), spec,
                                  grad_cost(inputs, r, c, cores, per_core, spec, major), prefetch,
                                  *_oriented(inputs, major), packed, tgt, scratch=scratch)
    # Rows of skipped blocks were never written (and ignored rows of kept blocks hold zeros).
    gh = jnp.where(keep_N[:, None], jnp.sum(gh_parts, axis=0)[:n], 0.0)
    return gh, gw.T if major[0] else gw


def fused_grads(hs, ws, ht, wt, stats, cots, targets_N, spec: DivergenceSpec):
    """pallas_common.Backend.fused_grads: the whole vocabulary is one slice."""
    return slice_grads(hs, ws, ht, wt, stats, cots, targets_N, _default_limit(spec, ws.shape[1]), spec)


LOCAL = vocab_parallel.LocalBackend(slice_stats, slice_jsd_kls, slice_grads)
divergence, fused_linear_divergence = pallas_common.make(pallas_common.Backend(row_stats, logits_grad, fused_grads))
