"""Vocabulary-parallel form of the fused divergence: the trainer's jit calls it in a `shard_map`.

Letters: N tokens, n tokens per shard, V vocabulary, v vocabulary columns per shard, Hs / Ht
student / teacher hidden widths.

Tokens are split over the mesh axes of the logical "batch" axis and the heads' vocabulary over
those of "vocab" (parallel.LOGICAL_AXIS_RULES: (data, fsdp) and tensor). A shard's rows are
completed over the vocabulary axes by collectives of [n] (or per-block [R]) vectors: one pmax of
the maxima and one psum of the rescaled sums, the entropy and KL cross terms; one psum for the
target logits (the slice holding a target contributes it) and one for the JSD's second pass; the
backward adds one psum of the cotangents. A shard's gradients are local: its d/dh is a partial
sum over its vocabulary slice and its d/dW covers its tokens only; shard_map's transpose sums the
first over the vocabulary axes and the second over the token axes, because each input's spec
leaves those axes out. The head is never gathered over the vocabulary axes and no [N, V] array
exists. A head's fsdp split (of its hidden dimension for a tied head, of its vocabulary after
tensor for an untied one: parallel's "head_vocab") is gathered at the shard_map boundary, as
FSDP does anyway, except where gathering the token rows over fsdp needs fewer bytes
(`row_gather_axes`): the vocabulary is then split over fsdp too, each shard of an fsdp group
sweeps all of the group's rows against its [H, V / (t f)] slice (a tied head is resharded to
it; an untied head is stored so, and its d/dW is formed in place). Both forms gather those rows
themselves, a chunk at a time, and hand each chunk's outputs and d/dh back to their shards (a
reduce-scatter) before the next (`xla.gathered_fused_linear_divergence`, `_gathered_shard`), so
a chip holds half its own n rows' worth of gathered rows and float32 d/dh at a time, not f n.

Two forms, by implementation:
- xla, one sweep: per token block, the [R, v] tiles stay live while their statistics are
  completed across the slices, so the forward forms the gradients too (8 N H V, `xla.py`).
- Statistics first, for the Pallas kernels (which XLA cannot partition: Mosaic on TPU, Triton
  on GPU) and their fixed tiles: an implementation's `LocalBackend` sums statistics of its slice
  without forming it, the rows are completed once, and the backward recomputes the tiles (12 N
  H V for the KLs).
reference (plain jnp that XLA partitions itself) runs token-parallel with the head replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from opsd_jax.kernels import pallas_common, rows
from opsd_jax.kernels.spec import DivergenceOutput, DivergenceSpec


class LocalBackend(NamedTuple):
    """One implementation's statistics of a vocabulary slice (inputs = (hs, ws, ht, wt) with heads
    [H, v]; targets int32 [n] are *slice* column ids, -1 when the target lies elsewhere; limit is
    an int32 scalar: slice columns at or past it are excluded (padding, or past the tokenizer)).

    stats(inputs, targets_n, mask_n, limit, spec) -> (rows.OnlineStats of float32 [n], (s, t)
        target logits float32 [n] (0 where the target is elsewhere) or None); token blocks
        without a kept row (mask_n) may be skipped, their rows' values are then meaningless
    jsd_kls(inputs, log_zs_n, log_zt_n, mask_n, limit, spec) -> (KL(p_s||m), KL(p_t||m)) slice
        shares [n]
    grads(hs, ws, ht, wt, stats, cots, targets_n, limit, spec) -> (float32 [n, Hs] d/dh over this
        slice, float32 [Hs, v] d/dW of this slice from these tokens); stats: whole-row
        rows.RowStats; cots as in pallas_common (zero for ignored tokens, whose rows may be
        skipped: their d/dh rows are zero).
    """

    stats: Callable
    jsd_kls: Callable
    grads: Callable


def combined_row_stats(local: LocalBackend, inputs, targets_n, mask_n, limit, spec: DivergenceSpec, axis_name=()):
    """(rows.RowStats of the whole rows, target logits (s, t) or None), float32 [n] each, from
    this shard's slice and collectives over `axis_name` (() : the slice is the whole vocabulary).
    Rows the mask ignores may hold anything (they are selected away downstream)."""
    partial, target_logits = local.stats(inputs, targets_n, mask_n, limit, spec)
    stats = rows.online_combine(partial, axis_name, spec.beta)
    kls = None
    if rows.divergence_mode(spec.beta) == "jsd":
        log_zs_n, log_zt_n = rows.online_log_normalizers(stats)
        kls = local.jsd_kls(inputs, log_zs_n, log_zt_n, mask_n, limit, spec)
        if axis_name:
            kls = jax.lax.psum(kls, axis_name)
    if target_logits is not None and axis_name:
        # Only the shard holding the target contributes a nonzero logit.
        target_logits = jax.lax.psum(target_logits, axis_name)
    return rows.finish_row_stats(stats, spec.beta, kls), target_logits


def _forward(local, spec, axis_name, hs, ws, ht, wt, mask_n, targets_n, limit):
    inputs = (hs, ws, ht, wt)
    stats, target_logits = combined_row_stats(local, inputs, targets_n, mask_n, limit, spec, axis_name)
    return pallas_common.outputs_from_stats(stats, target_logits, mask_n), stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _shard(local, spec, axis_name, hs, ws, ht, wt, mask_n, targets_n, limit):
    return _forward(local, spec, axis_name, hs, ws, ht, wt, mask_n, targets_n, limit)[0]


def _shard_fwd(local, spec, axis_name, hs, ws, ht, wt, mask_n, targets_n, limit):
    out, stats = _forward(local, spec, axis_name, hs, ws, ht, wt, mask_n, targets_n, limit)
    return out, (hs, ws, ht, wt, mask_n, targets_n, limit, stats)


def _shard_bwd(local, spec, axis_name, residuals, cot: DivergenceOutput):
    hs, ws, ht, wt, mask_n, targets_n, limit, stats = residuals
    cots = pallas_common.cotangents(cot, mask_n, targets_n)
    if axis_name:
        # The outputs are replicated over the vocabulary axes, so shard_map's transpose hands each
        # vocabulary shard 1/size of their cotangent (check_vma=False); every shard's partial
        # needs all of it. (It also divides over token axes that replicate the tokens, and the
        # matching psum of the input cotangents over those axes undoes that.)
        cots = tuple(None if c is None else jax.lax.psum(c, axis_name) for c in cots)
    gh, gw = local.grads(hs, ws, ht, wt, stats, cots, targets_n, limit, spec)
    return gh.astype(hs.dtype), gw.astype(ws.dtype), None, None, None, None, None


_shard.defvjp(_shard_fwd, _shard_bwd)


def _zero_row_stats(n: int) -> rows.RowStats:
    return rows.RowStats(*(jnp.zeros((n,), jnp.float32) for _ in rows.RowStats._fields))


def _gathered_forward(local, spec, axis_name, gather_axes, group, hs, ws, ht, wt, mask_n, targets_n, offset, limit):
    """(outputs, whole-row rows.RowStats) of this shard's own n rows, float32 [n] each: `_forward`
    over the token rows of the group's `group` shards (`gather_axes`), gathered a chunk at a time
    (xla.gather_chunks). Every shard of the group sweeps every chunk's rows against its own slice
    and completes them by the collectives over `axis_name` (which include gather_axes), then keeps
    its own rows. targets_n: global token ids int32 [n] or None."""
    from opsd_jax.kernels import xla

    n = hs.shape[0]
    r = n // xla.gather_chunks(n, group)

    def chunk_step(c, carry):
        def take(x_n):
            return xla.gathered_chunk(x_n, c, r, gather_axes)

        mask_c = take(mask_n)
        tgt_c = None if targets_n is None else rows.slice_targets(take(targets_n), offset, limit)
        stats_c, target_logits = combined_row_stats(local, (take(hs), ws, take(ht), wt), tgt_c, mask_c, limit, spec,
                                                    axis_name)
        values_c = (pallas_common.outputs_from_stats(stats_c, target_logits, mask_c), stats_c)
        return jax.tree.map(lambda o_n, o_c: xla.keep_own_rows(o_n, o_c, c, gather_axes), carry, values_c)

    zeros = jnp.zeros((n,), jnp.float32)
    outs0 = DivergenceOutput(zeros, zeros, zeros, *((zeros, zeros) if targets_n is not None else ()))
    return jax.lax.fori_loop(0, n // r, chunk_step, (outs0, _zero_row_stats(n)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _gathered_shard(local, spec, axis_name, gather_axes, group, hs, ws, ht, wt, mask_n, targets_n, offset, limit):
    return _gathered_forward(local, spec, axis_name, gather_axes, group, hs, ws, ht, wt, mask_n, targets_n, offset,
                             limit)[0]


def _gathered_shard_fwd(local, spec, axis_name, gather_axes, group, hs, ws, ht, wt, mask_n, targets_n, offset, limit):
    out, stats = _gathered_forward(local, spec, axis_name, gather_axes, group, hs, ws, ht, wt, mask_n, targets_n,
                                   offset, limit)
    return out, (hs, ws, ht, wt, mask_n, targets_n, offset, limit, stats)


def _gathered_shard_bwd(local, spec, axis_name, gather_axes, group, residuals, cot: DivergenceOutput):
    """The statistics-first backward a chunk at a time: each chunk's rows, stats and cotangents are
    gathered again, the slice's gradient kernel runs on them, the chunk's d/dh partials go back to
    the shards owning the rows (a reduce-scatter over the group) and d/dW of this slice adds up
    over the chunks."""
    from opsd_jax.kernels import xla

    hs, ws, ht, wt, mask_n, targets_n, offset, limit, stats = residuals
    cots = pallas_common.cotangents(cot, mask_n, targets_n)
    # The outputs are split over gather_axes like the rows and replicated over the other
    # vocabulary axes, whose shards shard_map's transpose hands 1/size of the cotangent each.
    replicated = tuple(a for a in axis_name if a not in gather_axes)
    if replicated:
        cots = tuple(None if x is None else jax.lax.psum(x, replicated) for x in cots)
    n, width = hs.shape
    r = n // xla.gather_chunks(n, group)

    def chunk_step(c, carry):
        gh_n, gw = carry

        def take(x_n):
            return None if x_n is None else xla.gathered_chunk(x_n, c, r, gather_axes)

        tgt_c = None if targets_n is None else rows.slice_targets(take(targets_n), offset, limit)
        gh_c, gw_c = local.grads(take(hs), ws, take(ht), wt, jax.tree.map(take, stats), tuple(map(take, cots)),
                                 tgt_c, limit, spec)
        mine_rxH = jax.lax.psum_scatter(gh_c, gather_axes, scatter_dimension=0, tiled=True)
        return jax.lax.dynamic_update_slice_in_dim(gh_n, mine_rxH, c * r, axis=0), gw + gw_c

    carry0 = (jnp.zeros((n, width), jnp.float32), jnp.zeros(ws.shape, jnp.float32))
    gh, gw = jax.lax.fori_loop(0, n // r, chunk_step, carry0)
    return gh.astype(hs.dtype), gw.astype(ws.dtype), None, None, None, None, None, None


_gathered_shard.defvjp(_gathered_shard_fwd, _gathered_shard_bwd)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _axes_of(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_axes(mesh: Mesh, n: int, vocab: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(token axes, vocabulary axes): the mesh axes of size > 1 that split the N tokens and the
    V vocabulary columns, from the logical-axis rules; an axis that does not divide its dimension
    is left out (that dimension is then replicated over it)."""
    from opsd_jax.parallel import logical_to_spec

    token_axes = _axes_of(logical_to_spec(("batch",), (n,), mesh)[0])
    vocab_axes = _axes_of(logical_to_spec(("vocab",), (vocab,), mesh)[0])
    if set(token_axes) & set(vocab_axes):
        raise ValueError(f"tokens {token_axes} and vocabulary {vocab_axes} must not share a mesh axis")
    return token_axes, vocab_axes


def local_backend(impl: str) -> LocalBackend | None:
    """The statistics-first slice backend of `impl`, or None where it has none (xla sweeps once
    instead; reference runs token-parallel)."""
    if impl == "pallas_tpu":
        from opsd_jax.kernels import pallas_tpu

        return pallas_tpu.LOCAL
    if impl == "pallas_gpu":
        from opsd_jax.kernels import pallas_gpu

        return pallas_gpu.LOCAL
    return None


def gradient_in_forward(impl: str, mesh: Mesh | None, n: int, vocab: int) -> bool:
    """Whether `impl` on `mesh` forms the student's gradients in the same sweep as the statistics,
    for the `weights` it is given: the XLA kernel, on any mesh (its tiles of whole rows, or of a
    vocabulary slice whose statistics are completed by collectives, stay live until G is formed).
    The Mosaic and Triton kernels compute statistics first without keeping the tiles: their
    gradient is one more sweep, run in the backward with the actual cotangents. (mesh, n and
    vocab are accepted so that a future kernel may depend on them.)"""
    del mesh, n, vocab
    return impl == "xla"


def _specs(mesh: Mesh, n: int, vocab: int, vocab_parallel: bool, row_gather: tuple[str, ...] = ()):
    """(token rows spec, head spec, [N] vector spec, vocabulary axes, columns per slice).
    row_gather: token axes whose shards gather their rows and split the vocabulary instead
    (`row_gather_axes`); their slices come after the vocabulary axes' own. The shard_map's body
    gathers those rows itself (in chunks), so at its boundary they stay split like the tokens."""
    token_axes, vocab_axes = mesh_axes(mesh, n, vocab)
    if not vocab_parallel:
        vocab_axes = ()
    vocab_axes = vocab_axes + tuple(row_gather)
    v = vocab // math.prod(mesh.shape[a] for a in vocab_axes)
    return (PartitionSpec(_entry(token_axes), None), PartitionSpec(None, _entry(vocab_axes)),
            PartitionSpec(_entry(token_axes)), vocab_axes, v)


def _head_split_axes(mesh: Mesh, width: int, vocab: int) -> tuple[str, ...]:
    """The mesh axes besides the vocabulary's own ("vocab": tensor) that split a stored head:
    fsdp, over its hidden dimension (a tied head, the embedding's transpose: "embed") or over its
    vocabulary after tensor (an untied head: "head_vocab"). Either way a group of those shards can
    gather its token rows and split the vocabulary between them."""
    from opsd_jax.parallel import logical_to_spec

    vocab_axes = _axes_of(logical_to_spec(("vocab",), (vocab,), mesh)[0])
    axes: list[str] = []
    for logical in (("embed", "vocab"), ("head_embed", "head_vocab")):
        for entry in logical_to_spec(logical, (width, vocab), mesh):
            axes += [a for a in _axes_of(entry) if a not in vocab_axes and a not in axes]
    return tuple(axes)


def gather_bytes(f: int, n: int, v: int, widths: tuple[int, int], row_bytes: int, head_bytes: int | None = None,
                 gradients: bool = True, chunk_rows: int | None = None) -> tuple[int, int]:
    """(bytes per chip of gathering the heads, of gathering the token rows) for a kernel where f
    shards split both the tokens (n rows each) and the heads' hidden dimension, and v columns are
    this chip's vocabulary slice otherwise. Only what differs is counted. Heads: both [H, v]
    heads and the student's float32 d/dW [Hs, v] before its reduction over the f shards. Rows:
    the rows of both models gathered at once (chunk_rows of them, default all f n; row_bytes)
    and the student's float32 d/dh of those rows before their reduce-scatter, both heads
    resharded to [H, v / f] and d/dW [Hs, v / f]. head_bytes: the dtype the heads move in
    (default row_bytes: XLA converts a float32 head for the matmul before gathering it; the
    Mosaic kernels cast tiles themselves, so their heads move as stored).
    An untied head stored as the kernel reads it (parallel's "head_vocab") needs neither the
    resharded copy nor a separate d/dW, so for it the rows' count is high by those terms and the
    rule errs toward gathering the heads.
    Gathered whole, at H = 4096, v = 151,936, f = 4 this predicted 4.6 GiB for the heads against
    the rows' 2.4 / 3.4 / 5.4 GiB at n = 8,192 / 16,384 / 32,768, where the AOT compile measured
    4.8-4.9 against 2.2 / 3.2 / 5.2 (xla, before it gathered in chunks). In chunks: BUILD_NOTES,
    issue 12, "Token rows gathered a chunk at a time" (xla) and "pallas_tpu gathers token rows
    in chunks too".
    gradients False: statistics only (no d/dW, no d/dh).
    """
    hs, ht = widths
    head_bytes = row_bytes if head_bytes is None else head_bytes
    grad = 4 if gradients else 0
    per_column = (hs + ht) * head_bytes + hs * grad
    rows_at_once = f * n if chunk_rows is None else chunk_rows
    return per_column * v, rows_at_once * ((hs + ht) * row_bytes + hs * grad) + per_column * (v // f)


def row_gather_axes(mesh: Mesh, n: int, vocab: int, widths: tuple[int, int], impl: str, *, row_bytes: int,
                    head_bytes: int | None = None, choice: bool | None = None,
                    gradients: bool = True) -> tuple[str, ...]:
    """The token axes (fsdp) whose shards gather their token rows and split the heads' vocabulary
    f times further, instead of gathering the heads' fsdp split of the hidden dimension (FSDP's
    own all-gather). Empty: gather the heads.

    Gathering rows trades [H, V/t] heads per chip for gathered [., H] rows, a chunk of about n at
    a time (xla.gather_chunks), which wins until the tokens a group of f shards holds are many
    against the vocabulary (`gather_bytes`, which the AOT compile confirmed: BUILD_NOTES, issue
    12). choice True / False forces it where possible / off; None takes the smaller by
    `gather_bytes`. xla and the Pallas kernels (the vocabulary-parallel forms); reference runs
    token-parallel. n: all tokens.
    """
    if impl not in ("xla", "pallas_tpu", "pallas_gpu") or choice is False:
        return ()
    token_axes, vocab_axes = mesh_axes(mesh, n, vocab)
    # The student's head is the one whose gathered copy and float32 gradient matter.
    split = _head_split_axes(mesh, widths[0], vocab)
    axes = tuple(a for a in token_axes if a in split)
    if not axes:
        return ()
    f = math.prod(mesh.shape[a] for a in axes)
    t = math.prod(mesh.shape[a] for a in vocab_axes)
    if vocab % (f * t):
        return ()
    if choice:
        return axes
    shard_rows = n // math.prod(mesh.shape[a] for a in token_axes)
    from opsd_jax.kernels import xla

    chunk_rows = f * shard_rows // xla.gather_chunks(shard_rows, f)
    heads, rows_ = gather_bytes(f, shard_rows, vocab // t, widths, row_bytes, head_bytes, gradients, chunk_rows)
    return axes if rows_ < heads else ()


def _hidden_shards(mesh: Mesh, width: int, vocab: int) -> int:
    """Into how many shards a tied head's hidden dimension is stored on `mesh` (its "embed" axis,
    fsdp): the shard_map gathers them, but XLA lays the gathered head out as it lays out the
    stored shard (see tpu_vmem.vocab_major). An untied head keeps it whole, and at the widths of
    the models here (H / fsdp a multiple of 128) the rule's answer is the same either way."""
    from opsd_jax.parallel import logical_to_spec

    return math.prod(mesh.shape[a] for a in _axes_of(logical_to_spec(("embed", "vocab"), (width, vocab), mesh)[0]))


def _slice_position(vocab_axes, v: int, allowed: int):
    """(first global column of this shard's slice, int32 number of its allowed columns)."""
    offset = jax.lax.axis_index(vocab_axes) * v if vocab_axes else 0
    return offset, jnp.clip(allowed - offset, 0, v).astype(jnp.int32)


def fused_linear_divergence(hs_NxHs, ws_HsxV, ht_NxHt, wt_HtxV, mask_N, targets_N, weights_N,
                            spec: DivergenceSpec, *, mesh: Mesh, impl: str, whole: Callable) -> DivergenceOutput:
    """api.fused_linear_divergence on `mesh`: vocabulary-parallel for xla (one sweep) and the
    Pallas kernels (statistics first), else token-parallel around `whole` (the implementation's
    single-device function, heads replicated). xla on a mesh that does not split the vocabulary
    runs `whole` on each shard's whole rows.

    Same arguments and result as the implementation functions (mask bool [N], targets int32 [N] or
    None, weights float32 [N] or None); the result's [N] arrays are split over the token axes.
    """
    n, vocab = hs_NxHs.shape[0], ws_HsxV.shape[1]
    local = local_backend(impl)
    row_gather = row_gather_axes(mesh, n, vocab, (hs_NxHs.shape[1], ht_NxHt.shape[1]), impl,
                                 row_bytes=hs_NxHs.dtype.itemsize,
                                 head_bytes=ws_HsxV.dtype.itemsize if local is not None else None,
                                 choice=spec.gather_token_rows)
    one_sweep = impl == "xla" and bool(mesh_axes(mesh, n, vocab)[1] or row_gather)
    rows_spec, head_spec, vec_spec, vocab_axes, v = _specs(mesh, n, vocab, local is not None or one_sweep,
                                                           row_gather)
    group = math.prod(mesh.shape[a] for a in row_gather)
    if local is not None or one_sweep:
        # Resharded to whole hidden columns, the heads are no longer stored split over fsdp.
        shards = 1 if row_gather else _hidden_shards(mesh, hs_NxHs.shape[1], vocab)
        spec = dataclasses.replace(spec, head_hidden_shards=shards)
    with_targets = targets_N is not None
    with_weights = weights_N is not None
    # Placeholders: shard_map takes arrays.
    targets_N = jnp.zeros((n,), jnp.int32) if targets_N is None else targets_N
    weights_N = jnp.zeros((n,), jnp.float32) if weights_N is None else weights_N
    allowed = vocab if spec.valid_vocab is None else spec.valid_vocab

    def body(hs, ws, ht, wt, mask_n, targets_n, weights_n):
        tgt = targets_n if with_targets else None
        wts = weights_n if with_weights else None
        if local is None and not one_sweep:
            return whole(hs, ws, ht, wt, mask_n, tgt, wts, spec)
        offset, limit = _slice_position(vocab_axes, v, allowed)
        from opsd_jax.kernels import xla

        # Both forms gather the token rows themselves, a chunk at a time.
        if row_gather and one_sweep:
            return xla.gathered_fused_linear_divergence(hs, ws, ht, wt, mask_n, tgt, wts, offset, limit, spec,
                                                        vocab_axes, row_gather, group)
        if row_gather:
            return _gathered_shard(local, spec, tuple(vocab_axes), tuple(row_gather), group, hs, ws, ht, wt, mask_n,
                                   tgt, offset, limit)
        if tgt is not None:
            tgt = rows.slice_targets(tgt, offset, limit)
        if one_sweep:
            return xla.slice_fused_linear_divergence(hs, ws, ht, wt, mask_n, tgt, wts, limit, spec, vocab_axes)
        return _shard(local, spec, vocab_axes, hs, ws, ht, wt, mask_n, tgt, limit)

    sharded = jax.shard_map(
        body, mesh=mesh, in_specs=(rows_spec, head_spec, rows_spec, head_spec, vec_spec, vec_spec, vec_spec),
        out_specs=vec_spec, check_vma=False,
    )
    return sharded(hs_NxHs, ws_HsxV, ht_NxHt, wt_HtxV, mask_N, targets_N, weights_N)


def student_statistics(hs_NxH, ws_HxV, mask_N, targets_N, spec: DivergenceSpec, *, mesh: Mesh | None):
    """(student entropy, student log-prob of the targets or None), float32 [N], zero for ignored
    tokens: api.student_statistics, the XLA student-only sweep; on a mesh, vocabulary-parallel
    like the fused form (one pmax and one psum of [n] vectors, the target's logit psummed, the
    token rows gathered over fsdp a chunk at a time where `row_gather_axes` says so)."""
    from opsd_jax.kernels import xla

    n, vocab = hs_NxH.shape[0], ws_HxV.shape[1]
    with_targets = targets_N is not None
    allowed = vocab if spec.valid_vocab is None else spec.valid_vocab

    def rows_stats(hs, ws, mask_n, targets_n, vocab_axes, v):
        offset, limit = _slice_position(vocab_axes, v, allowed)
        tgt = rows.slice_targets(targets_n, offset, limit) if with_targets else None
        m_n, s_n, b_n, target_n = xla.student_slice_stats(hs, ws, mask_n, tgt, limit, spec)
        m_n, s_n, b_n = rows.side_combine(m_n, s_n, b_n, vocab_axes)
        log_z_n, entropy_n = rows.side_finish(m_n, s_n, b_n)
        entropy_n = jnp.where(mask_n, entropy_n, 0.0)
        if not with_targets:
            return entropy_n, jnp.zeros_like(entropy_n)
        if vocab_axes:
            target_n = jax.lax.psum(target_n, vocab_axes)
        return entropy_n, jnp.where(mask_n, target_n - log_z_n, 0.0)

    def body(hs, ws, mask_n, targets_n, vocab_axes=(), v=vocab, gather_axes=(), group=1):
        if not gather_axes:
            return rows_stats(hs, ws, mask_n, targets_n, vocab_axes, v)
        chunks = xla.gather_chunks(hs.shape[0], group)
        r = hs.shape[0] // chunks

        def chunk_step(c, outs):
            taken = (xla.gathered_chunk(x, c, r, gather_axes) for x in (hs, mask_n, targets_n))
            hs_c, mask_c, targets_c = taken
            values = rows_stats(hs_c, ws, mask_c, targets_c, vocab_axes, v)
            return tuple(xla.keep_own_rows(o_n, o_c, c, gather_axes) for o_n, o_c in zip(outs, values))

        zeros = jnp.zeros((hs.shape[0],), jnp.float32)
        return jax.lax.fori_loop(0, chunks, chunk_step, (zeros, zeros))

    placeholder = jnp.zeros((n,), jnp.int32) if targets_N is None else targets_N
    if mesh is None or mesh.size == 1:
        entropy_N, logprob_N = body(hs_NxH, ws_HxV, mask_N, placeholder)
    else:
        row_gather = row_gather_axes(mesh, n, vocab, (hs_NxH.shape[1], 0), "xla", row_bytes=hs_NxH.dtype.itemsize,
                                     choice=spec.gather_token_rows, gradients=False)
        rows_spec, head_spec, vec_spec, vocab_axes, v = _specs(mesh, n, vocab, True, row_gather)
        group = math.prod(mesh.shape[a] for a in row_gather)
        sharded = jax.shard_map(
            functools.partial(body, vocab_axes=vocab_axes, v=v, gather_axes=row_gather, group=group), mesh=mesh,
            in_specs=(rows_spec, head_spec, vec_spec, vec_spec), out_specs=(vec_spec, vec_spec), check_vma=False,
        )
        entropy_N, logprob_N = sharded(hs_NxH, ws_HxV, mask_N, placeholder)
    return entropy_N, (logprob_N if with_targets else None)
