"""Attention with backends behind one function: dense (the oracle), chunked (online softmax over
key/value blocks, any platform), cuDNN flash attention on GPU and Pallas splash attention on TPU.

Shape letters: B batch, T queries, S keys, H query heads, K kv heads, G query heads per kv head
(H = K * G), D head width; bq / bk query / key block lengths, nq / nk block counts.

Who may attend to whom is described by integers, never by a [T, S] mask, so the chunked backend can
build each [bq, bk] tile of the mask on the fly and skip tiles that are entirely masked:

    query t may attend key s  iff  s <= row[t]                      (causal)
                                   and s > row[t] - sliding_window  (sliding layers only)
                                   and segment[t] == key_segment[s] != 0

`row[t]` is the key index the query sits at: t itself for self-attention over the given tokens,
its position for queries against a KV cache (cache row = position). Segment 0 is padding: a query
there attends nowhere, and, as in the dense path, its output is the mean of all values.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from opsd_jax.models import layers
from opsd_jax.models.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from opsd_jax.plan.hlo_flops import estimate_scope, trips_scope

DEFAULT_BLOCK_SIZE = 512


def attend(
    q_BxTxHxD,
    k_BxSxKxD,
    v_BxSxKxD,
    *,
    query_rows_BxT=None,
    query_segment_ids_BxT=None,
    key_segment_ids_BxS=None,
    sliding_window: int | None = None,
    implementation: str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
):
    """Grouped-query attention; returns [B, T, H, D] in v's dtype.

    query_rows_BxT: int32, default arange(T) (self-attention). Segment ids: int32, default all 1
    (no padding). `implementation`:
      "auto": cuDNN on GPU where it applies; on TPU splash where it applies and its kernel can be
        split over the context mesh without repeating work (see `splash_attention`); else chunked.
        The TPU is recognized from the mesh set with `jax.set_mesh` (an ahead-of-time compile for
        TPU devices from a CPU host counts as TPU) or, without one, from the default backend with a
        single device: a Mosaic kernel in a multi-device jit without a known mesh cannot be
        partitioned, so "auto" then stays chunked.
      "dense": materializes float32 [B, K, G, T, S] scores (the oracle).
      "chunked": online softmax over key blocks, any platform; self-attention under a context mesh
        runs whole (sequence, kv head) pairs on each chip (`_head_parallel_chunked`), or, where the
        pairs do not divide over the chips, a slice of the queries against all keys
        (`_query_parallel_chunked`).
      "cudnn": falls back to chunked where cuDNN's constraints do not hold.
      "splash": Pallas TPU splash attention (TPU interpret mode off TPU, for tests); falls back to
        chunked where it does not apply: queries against a cache (`query_rows_BxT` given), T != S,
        or query and key segment ids that are not the same array (a padding query is then not
        recognizable from its own id alone). T need not be a multiple of the kernel's block: the
        sequence is padded with keys nobody sees.
    `block_size` bounds the chunked backend's tiles; splash rounds it up to a multiple of 128.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; supported: {', '.join(IMPLEMENTATIONS)}")
    batch, length = q_BxTxHxD.shape[:2]
    keys = k_BxSxKxD.shape[1]
    self_attention = query_rows_BxT is None
    # Splash recognizes a padding query by its own segment id only when keys carry the same ids.
    shared_segments = query_segment_ids_BxT is key_segment_ids_BxS
    splash_segments = query_segment_ids_BxT
    if self_attention:
        query_rows_BxT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if query_segment_ids_BxT is None:
        query_segment_ids_BxT = jnp.ones((batch, length), jnp.int32)
    if key_segment_ids_BxS is None:
        key_segment_ids_BxS = jnp.ones((batch, keys), jnp.int32)
    inputs = (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, query_rows_BxT, query_segment_ids_BxT, key_segment_ids_BxS)

    splash_applies = _splash_applies(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, self_attention, shared_segments)
    if implementation == "auto":
        if jax.default_backend() == "gpu":
            implementation = "cudnn"
        elif splash_applies and _splash_is_native(q_BxTxHxD.shape[0], k_BxSxKxD.shape[2]):
            implementation = "splash"
        else:
            implementation = "chunked"
    if implementation == "splash" and splash_applies:
        return splash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, splash_segments, sliding_window, block_size)
    if implementation == "cudnn" and _cudnn_applies(q_BxTxHxD, k_BxSxKxD, self_attention):
        return _cudnn_or_chunked(*inputs, sliding_window, block_size)
    if implementation == "dense":
        return dense_attention(*inputs, sliding_window)
    return chunked_attention(*inputs, sliding_window, block_size, self_attention=self_attention)


def attention_mask(query_rows_BxT, query_segment_ids_BxT, key_segment_ids_BxS, sliding_window, key_start=0):
    """bool[B, T, S]: the rule in the module docstring for keys key_start .. key_start + S - 1."""
    key_index_S = key_start + jnp.arange(key_segment_ids_BxS.shape[1])
    rows_BxTx1 = query_rows_BxT[:, :, None]
    allowed_BxTxS = key_index_S <= rows_BxTx1
    if sliding_window is not None:
        allowed_BxTxS &= key_index_S > rows_BxTx1 - sliding_window
    same_segment_BxTxS = query_segment_ids_BxT[:, :, None] == key_segment_ids_BxS[:, None, :]
    return allowed_BxTxS & same_segment_BxTxS & (key_segment_ids_BxS != 0)[:, None, :]


def dense_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS, sliding_window):
    """The oracle: the whole [B, T, S] mask and float32 scores."""
    mask_BxTxS = attention_mask(rows_BxT, segments_BxT, key_segments_BxS, sliding_window)
    return layers.dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS)


# ---- chunked: online softmax over key blocks, flash-attention backward -------------------------


def chunked_attention(
    q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS, sliding_window,
    block_size: int = DEFAULT_BLOCK_SIZE, self_attention: bool = False,
):
    """Online softmax over [bq, bk] tiles; memory O(T * bk) per head, never [T, S].

    Tiles no query of a query block can see (future keys, keys behind every sliding window) are
    not computed, so causal attention does about half the work of the dense path. The backward
    recomputes each tile's probabilities from the saved log-sum-exp and stores no scores.
    `self_attention`: rows are arange(T) (as `attend` makes them). Under a context mesh the
    (sequence, kv head) pairs or the queries are then split over the mesh (`_chunked_split`); the
    flag also tells the plan's FLOP count how many key blocks the loops visit (`mean_key_blocks`).
    """
    inputs = (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS)
    batch, length = q_BxTxHxD.shape[:2]
    keys, kv_heads = k_BxSxKxD.shape[1:3]
    split, axes = (_chunked_split(batch, kv_heads, length, keys, block_size, sliding_window) if self_attention
                   else ("", ()))
    if split == "pairs":
        return _head_parallel_chunked(*inputs, sliding_window, block_size, axes)
    if split == "queries":
        return _query_parallel_chunked(*inputs, sliding_window, block_size, axes)
    return _chunked(*inputs, sliding_window, block_size, self_attention)


def _chunked_split(batch: int, kv_heads: int, length: int, keys: int, block_size: int,
                   window: int | None) -> tuple[str, tuple[str, ...]]:
    """How chunked self-attention splits over the context mesh's free axes: ("", ()) when there
    is no mesh or the free axes can split the batch itself (whole sequences on each chip need no
    collective: `analyze`, a microbatch with a sequence per chip); else ("pairs", axes) for
    `_head_parallel_chunked` or ("queries", axes) for `_query_parallel_chunked`, whichever leaves
    the busiest chip fewer [bq, bk] tile elements. Pairs split the work evenly but only over axes
    whose product divides the B x K pairs; the others then hold copies. Queries split over any
    axes that divide T, but a causal mask gives the chip holding the last positions about twice
    the mean. Ties go to pairs, whose all-to-alls move fewer bytes than gathering every key."""
    mesh = _context_mesh()
    if mesh is None:
        return "", ()
    sizes, free = dict(mesh.shape), _free_axes(mesh)
    if batch % math.prod(sizes[a] for a in free) == 0:
        return "", ()
    pair_axes = _dividing_axes(free, sizes, batch * kv_heads, length, keys)
    query_axes = _dividing_axes(free, sizes, length, keys)
    pair_shards = math.prod(sizes[a] for a in pair_axes)
    query_shards = math.prod(sizes[a] for a in query_axes)
    pairs_work = batch * kv_heads // pair_shards * _busiest_chip_tiles(length, keys, block_size, window, 1)
    queries_work = batch * kv_heads * _busiest_chip_tiles(length, keys, block_size, window, query_shards)
    if queries_work < pairs_work:
        return "queries", query_axes
    return ("pairs", pair_axes) if pair_axes else ("", ())


def _query_offsets(length: int, shards: int) -> tuple[int, ...]:
    """The first query row of each of `shards` equal position slices of arange(length)."""
    return tuple(range(0, length, length // shards))


def _busiest_chip_tiles(length: int, keys: int, block_size: int, window: int | None, shards: int) -> float:
    """[bq, bk] tile elements the `_chunked` loops visit for one (sequence, kv head) pair of causal
    self-attention whose T queries are split in `shards` position slices, on the slice that visits
    the most (with every key on each chip); mirrored slices (`_mirrored`) at the chips' mean."""
    def tiles(local: int, offsets, combine) -> float:
        block_q, block_k = min(block_size, local), min(block_size, keys)
        return -(-local // block_q) * block_q * block_k * combine(
            [mean_key_blocks(local, keys, block_q, block_k, window, True, first_row=offset) for offset in offsets])

    offsets = _query_offsets(length, shards)
    if not _mirrored(length, shards, window, block_size):
        return tiles(length // shards, offsets, max)
    half, mean = length // shards // 2, lambda values: sum(values) / len(values)
    return tiles(half, offsets, mean) + tiles(half, [o + half for o in offsets], mean)


def _dividing_axes(candidates, sizes: dict, *extents: int) -> tuple[str, ...]:
    """The candidate axes, in order, each taken when the product of those taken so far and its
    size divides every extent."""
    chosen: list[str] = []
    for axis in dict.fromkeys(candidates):
        shards = math.prod(sizes[a] for a in chosen) * sizes[axis]
        if all(extent % shards == 0 for extent in extents):
            chosen.append(axis)
    return tuple(chosen)


def _head_parallel_chunked(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS,
                           sliding_window, block_size: int, axes: tuple[str, ...]):
    """Chunked self-attention with positions split over `axes` outside and whole (sequence, kv
    head) pairs inside: one all-to-all each way, as in DeepSpeed-Ulysses.

    The trainer splits a microbatch of fewer sequences than chips by position. The key-block loops
    slice positions at run time, which XLA cannot partition, so every chip ran its sequences'
    whole attention: at Qwen3-8B on v5p-64 (4 sequences on 32 chips) each one eight times over,
    26,400 TFLOP per chip for a 6,700-TFLOP step. Here each chip runs B x K / n pairs over all
    positions, the same tiles and arithmetic as one device; idle axes (not in `axes`) hold copies.
    """
    batch, length, heads, head_dim = q_BxTxHxD.shape
    kv_heads = k_BxSxKxD.shape[2]
    group = heads // kv_heads
    mesh = _context_mesh()
    entry = _axes_entry(axes)
    pairs_per_chip = batch * kv_heads // math.prod(dict(mesh.shape)[a] for a in axes)

    def to_pairs(x_BxLxKxZ):
        """[B, L / n, K, ...] by position -> [B K / n, L, ...] by pair."""
        x = jnp.moveaxis(x_BxLxKxZ, 2, 1).reshape(batch * kv_heads, x_BxLxKxZ.shape[1], *x_BxLxKxZ.shape[3:])
        return jax.lax.all_to_all(x, entry, 0, 1, tiled=True)

    def local(q, k, v, rows, segments, key_segments):
        q_PxTxGxD = to_pairs(q.reshape(batch, q.shape[1], kv_heads, group, head_dim))
        k_PxSx1xD, v_PxSx1xD = to_pairs(k)[:, :, None], to_pairs(v)[:, :, None]
        sequence_P = (jax.lax.axis_index(entry) * pairs_per_chip + jnp.arange(pairs_per_chip)) // kv_heads
        out_PxTxGxD = _chunked(q_PxTxGxD, k_PxSx1xD, v_PxSx1xD, rows[sequence_P], segments[sequence_P],
                               key_segments[sequence_P], sliding_window, block_size, self_attention=True)
        out = jax.lax.all_to_all(out_PxTxGxD, entry, 1, 0, tiled=True)  # [B K, T / n, G, D]
        out = jnp.moveaxis(out.reshape(batch, kv_heads, *out.shape[1:]), 1, 2)
        return out.reshape(batch, out.shape[1], heads, head_dim)

    by_position, whole = PartitionSpec(None, entry), PartitionSpec()
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(by_position,) * 3 + (whole,) * 3, out_specs=by_position,
                            check_vma=False)
    return sharded(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT.astype(jnp.int32), segments_BxT.astype(jnp.int32),
                   key_segments_BxS.astype(jnp.int32))


def _query_parallel_chunked(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS,
                            sliding_window, block_size: int, axes: tuple[str, ...]):
    """Chunked self-attention with the queries split by position over `axes` and every key
    gathered onto each chip: for B x K pairs no axis divides (one sequence with 8 kv heads on 32
    or more chips), where `_head_parallel_chunked` would leave axes holding copies of the whole
    attention. Each chip visits only the key blocks its own queries can see. Under a causal mask
    the chips holding late positions would see the most, so where `_mirrored` holds each chip
    trades the second half of its queries with the chip at the mirror position (c <-> n-1-c, one
    collective permute each way): chip c then holds the (2c)-th and (2n-1-2c)-th of 2n slices,
    and every chip visits about the same tiles. The keys' gradients are summed back over `axes`
    in float32 (`_gather_positions`)."""
    mesh = _context_mesh()
    entry = _axes_entry(axes)
    length = q_BxTxHxD.shape[1]
    shards = math.prod(dict(mesh.shape)[a] for a in axes)
    offsets = _query_offsets(length, shards)
    mirrored = _mirrored(length, shards, sliding_window, block_size)
    half = length // shards // 2
    swap = [(c, shards - 1 - c) for c in range(shards)]

    def local(q, k, v, rows, segments, key_segments):
        k_all, v_all = _gather_positions(k, entry), _gather_positions(v, entry)
        if not mirrored:
            return _chunked(q, k_all, v_all, rows, segments, key_segments, sliding_window, block_size,
                            self_attention=True, query_offsets=offsets).astype(v.dtype)
        # One call over [own first half, received half] (one set of key gradient buffers), whose
        # query blocks never span the two; the plan counts it at the mean over chips, since a
        # chip's two halves sum to the same work on every chip.
        q, rows, segments = (jnp.concatenate([x[:, :half], jax.lax.ppermute(x[:, half:], entry, swap)], axis=1)
                             for x in (q, rows, segments))
        out = _chunked(q, k_all, v_all, rows, segments, key_segments, None, block_size, self_attention=True,
                       query_offsets=offsets, busiest=False, runs=2)
        return jnp.concatenate([out[:, :half], jax.lax.ppermute(out[:, half:], entry, swap)], axis=1).astype(v.dtype)

    by_position, whole = PartitionSpec(None, entry), PartitionSpec()
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(by_position,) * 5 + (whole,), out_specs=by_position,
                            check_vma=False)
    return sharded(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT.astype(jnp.int32), segments_BxT.astype(jnp.int32),
                   key_segments_BxS.astype(jnp.int32))


def _mirrored(length: int, shards: int, window: int | None, block_size: int) -> bool:
    """Whether `_query_parallel_chunked` balances its causal work by trading half-slices between
    mirror chips: more than one shard, no sliding window (a window already gives every chip about
    the same keys), and a slice that halves into whole query blocks."""
    local = length // shards
    half = local // 2
    return shards > 1 and window is None and local % 2 == 0 and half % min(block_size, half) == 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_positions(x_BxLxKxD, entry):
    """All of a shard_map's position slices [B, L / n, ...] -> float32[B, L, ...] on every chip,
    gathered in x's dtype. Each chip then holds a partial gradient for every key; in float32 it
    is summed over the chips before it is rounded to x's dtype once, where bfloat16 partials would
    each be rounded first (measured at 8 chips: dK's mean error 1.15x one device's, its largest
    2.5x)."""
    return jax.lax.all_gather(x_BxLxKxD, entry, axis=1, tiled=True).astype(jnp.float32)


def _gather_positions_fwd(x_BxLxKxD, entry):
    return _gather_positions(x_BxLxKxD, entry), jnp.zeros((), x_BxLxKxD.dtype)


def _gather_positions_bwd(entry, like, cotangent_BxLxKxD):
    summed = jax.lax.psum_scatter(cotangent_BxLxKxD.astype(jnp.float32), entry, scatter_dimension=1, tiled=True)
    return (summed.astype(like.dtype),)


_gather_positions.defvjp(_gather_positions_fwd, _gather_positions_bwd)


def _chunked(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS, sliding_window,
             block_size: int, self_attention: bool, query_offsets: tuple[int, ...] = (0,), busiest: bool = True,
             runs: int = 1):
    """`chunked_attention` on one device's (or one shard's) arrays. `query_offsets`: for
    self-attention, the first row each chip's queries may start at (a chip holding a slice of
    the positions); the plan counts the key blocks of the one that visits the most (`busiest`),
    else their mean over the chips. `runs`: the queries are that many equal runs of consecutive
    rows (mirrored query slices: 2), the r-th starting r run lengths after the offset up to a
    permutation of the chips; query blocks never span two runs."""
    batch, length, heads, head_dim = q_BxTxHxD.shape
    keys, kv_heads = k_BxSxKxD.shape[1:3]
    q_BxTxKxGxD = q_BxTxHxD.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    run = length // runs
    block_q, block_k = min(block_size, run), min(block_size, keys)
    pad_t = -length % block_q
    # Padded queries copy the last row so they widen no block's visible key range. Keys are never
    # padded: against a KV cache that would copy the whole cache every step; the last key block
    # is shifted back to end at S instead, its keys already seen masked out (_key_block).
    q_pad = jnp.pad(q_BxTxKxGxD, ((0, 0), (0, pad_t), (0, 0), (0, 0), (0, 0)))
    rows_pad = jnp.pad(rows_BxT.astype(jnp.int32), ((0, 0), (0, pad_t)), mode="edge")
    segments_pad = jnp.pad(segments_BxT.astype(jnp.int32), ((0, 0), (0, pad_t)))

    def over_chips(values):
        return max(values) if busiest else sum(values) / len(values)

    key_blocks = sum(over_chips([mean_key_blocks(run, keys, block_q, block_k, sliding_window, self_attention,
                                                 first_row=offset + r * run) for offset in query_offsets])
                     for r in range(runs)) / runs
    out_pad, lse_pad = _flash(q_pad, k_BxSxKxD, v_BxSxKxD, rows_pad, segments_pad, key_segments_BxS.astype(jnp.int32),
                              sliding_window, block_q, block_k, key_blocks)
    out_BxTxKxGxD, lse_BxTxKxG = out_pad[:, :length], lse_pad[:, :length]
    # A query that sees no key gets the mean of all values, exactly as the dense softmax over
    # all-masked scores does; it is differentiated here, outside the kernel. The sum is a matmul
    # accumulating in float32, so no float32 copy of the values (of a whole KV cache) appears in
    # any program, optimized or not.
    ones_S = jnp.ones((keys,), v_BxSxKxD.dtype)
    mean_v_BxKxD = jnp.einsum("bskd,s->bkd", v_BxSxKxD, ones_S, preferred_element_type=jnp.float32) / keys
    mean_v_Bx1xKx1xD = mean_v_BxKxD[:, None, :, None, :]
    empty_BxTxKxGx1 = jnp.isneginf(jax.lax.stop_gradient(lse_BxTxKxG))[..., None]
    out_BxTxKxGxD = jnp.where(empty_BxTxKxGx1, mean_v_Bx1xKx1xD.astype(out_BxTxKxGxD.dtype), out_BxTxKxGxD)
    return out_BxTxKxGxD.reshape(batch, length, heads, head_dim).astype(v_BxSxKxD.dtype)


# The key-block loops' bounds follow the mask, so XLA cannot read their trip counts; the plan's
# FLOP count takes them from this scope (hlo_flops.trips_scope).
KEY_BLOCKS_SCOPE = "flash_key_blocks"


def mean_key_blocks(length: int, keys: int, block_q: int, block_k: int, window: int | None,
                    self_attention: bool, first_row: int = 0) -> float:
    """Key blocks `_key_block_range` visits per query block, averaged over the T / bq blocks
    (padded queries repeat the last row). Exact for self-attention (rows first_row + arange(T):
    first_row > 0 for a slice of a sequence's queries against all its keys); against a cache the
    rows are positions known only at run time, so this is every key block: a full cache's cost,
    the most a step can spend."""
    num_key_blocks = -(-keys // block_k)
    num_query_blocks = -(-length // block_q)
    if not self_attention:
        return float(num_key_blocks)
    visited = 0
    for i in range(num_query_blocks):
        lowest, highest = first_row + i * block_q, first_row + min((i + 1) * block_q, length) - 1
        last = min(highest // block_k + 1, num_key_blocks)
        first = 0 if window is None else min(max((lowest - window + 1) // block_k, 0), num_key_blocks)
        visited += max(last - first, 0)
    return visited / num_query_blocks


def _key_block_range(rows_BxT, query_block: int, block_q: int, block_k: int, num_key_blocks: int, window):
    """[first, last) key blocks that any query of query block `query_block` may see."""
    rows = jax.lax.dynamic_slice_in_dim(rows_BxT, query_block * block_q, block_q, axis=1)
    last = jnp.clip(jnp.max(rows) // block_k + 1, 0, num_key_blocks)
    if window is None:
        return jnp.int32(0), last
    first = jnp.clip((jnp.min(rows) - window + 1) // block_k, 0, num_key_blocks)
    return first, last


def _tile_scores(q_BxTxKxGxD, k_BxSxKxD, head_dim: int):
    """float32[B, K, G, bq, bk], scaled as the dense path scales them."""
    return jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) / math.sqrt(head_dim)


def _slice_block(x, index, size):
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=1)


def _key_block(k, v, rows_i, segments_i, key_segments, j, block_k, window, dtype):
    """(k_j, v_j in `dtype`, mask bool[B, bq, bk], start) of key block j. Blocks are ceil(S / bk);
    the last one starts at S - bk so it stays inside the keys, and its keys before j * bk
    (already in block j - 1) are masked out."""
    keys = k.shape[1]
    start = jnp.minimum(j * block_k, keys - block_k)
    k_j = jax.lax.dynamic_slice_in_dim(k, start, block_k, axis=1).astype(dtype)
    v_j = jax.lax.dynamic_slice_in_dim(v, start, block_k, axis=1).astype(dtype)
    key_segments_j = jax.lax.dynamic_slice_in_dim(key_segments, start, block_k, axis=1)
    mask_BxTxS = attention_mask(rows_i, segments_i, key_segments_j, window, key_start=start)
    fresh_S = start + jnp.arange(block_k) >= j * block_k
    return k_j, v_j, mask_BxTxS & fresh_S, start


def _flash_forward(q, k, v, rows, segments, key_segments, window, block_q, block_k, key_blocks):
    """(out [B, T, K, G, D] in q's dtype (0 where a query sees no key), lse float32[B, T, K, G]
    (-inf there)). T is a multiple of block_q; S is at least block_k. The tiles compute in q's
    dtype: keys and values held in float32 (`_query_parallel_chunked`) are cast a tile at a
    time, and their gradients come back in float32."""
    batch, length, kv_heads, group, head_dim = q.shape
    num_query_blocks, num_key_blocks = length // block_q, -(-k.shape[1] // block_k)

    def query_block(i, carry):
        out, lse = carry
        q_i = _slice_block(q, i, block_q)
        rows_i, segments_i = _slice_block(rows, i, block_q), _slice_block(segments, i, block_q)

        def key_block(j, state):
            max_BxKxGxT, sum_BxKxGxT, acc_BxKxGxTxD = state
            k_j, v_j, mask_BxTxS, _ = _key_block(k, v, rows_i, segments_i, key_segments, j, block_k, window, q.dtype)
            scores = jnp.where(mask_BxTxS[:, None, None], _tile_scores(q_i, k_j, head_dim), -jnp.inf)
            # The running max starts finite, so masked scores give exp(-inf) = 0, never NaN.
            new_max = jnp.maximum(max_BxKxGxT, jnp.max(scores, axis=-1))
            correction = jnp.exp(max_BxKxGxT - new_max)
            probs = jnp.exp(scores - new_max[..., None])
            acc_BxKxGxTxD = acc_BxKxGxTxD * correction[..., None] + jnp.einsum(
                "bkgts,bskd->bkgtd", probs.astype(q.dtype), v_j, preferred_element_type=jnp.float32
            )
            return new_max, sum_BxKxGxT * correction + jnp.sum(probs, axis=-1), acc_BxKxGxTxD

        stats_shape = (batch, kv_heads, group, block_q)
        init = (
            jnp.full(stats_shape, layers.MASKED_SCORE, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32),
        )
        first, last = _key_block_range(rows, i, block_q, block_k, num_key_blocks, window)
        with jax.named_scope(trips_scope(KEY_BLOCKS_SCOPE, key_blocks)):
            running_max, running_sum, acc = jax.lax.fori_loop(first, last, key_block, init)
        seen = running_sum > 0
        out_i = acc / jnp.where(seen, running_sum, 1.0)[..., None]
        lse_i = jnp.where(seen, running_max + jnp.log(jnp.where(seen, running_sum, 1.0)), -jnp.inf)
        out = jax.lax.dynamic_update_slice_in_dim(
            out, jnp.einsum("bkgtd->btkgd", out_i).astype(out.dtype), i * block_q, axis=1
        )
        lse = jax.lax.dynamic_update_slice_in_dim(lse, jnp.einsum("bkgt->btkg", lse_i), i * block_q, axis=1)
        return out, lse

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros(q.shape[:-1], jnp.float32))
    return jax.lax.fori_loop(0, num_query_blocks, query_block, init)


def _flash_backward(window, block_q, block_k, key_blocks, residuals, cotangents):
    """Gradients by recomputing each visible tile's probabilities from the saved log-sum-exp;
    dK and dV accumulate in float32 buffers of the keys' size."""
    q, k, v, rows, segments, key_segments, out, lse = residuals
    d_out, _ = cotangents  # lse is returned only to mark empty rows; it is never differentiated
    length, head_dim = q.shape[1], q.shape[-1]
    num_query_blocks, num_key_blocks = length // block_q, -(-k.shape[1] // block_k)
    delta_BxTxKxG = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    finite_lse = jnp.where(jnp.isneginf(lse), 0.0, lse)

    def query_block(i, carry):
        dq, dk, dv = carry
        q_i, d_out_i = _slice_block(q, i, block_q), _slice_block(d_out, i, block_q)
        rows_i, segments_i = _slice_block(rows, i, block_q), _slice_block(segments, i, block_q)
        lse_BxKxGxT = jnp.einsum("btkg->bkgt", _slice_block(finite_lse, i, block_q))
        delta_BxKxGxT = jnp.einsum("btkg->bkgt", _slice_block(delta_BxTxKxG, i, block_q))

        def key_block(j, state):
            dq_i, dk, dv = state
            k_j, v_j, mask_BxTxS, start = _key_block(k, v, rows_i, segments_i, key_segments, j, block_k, window,
                                                     q.dtype)
            scores = _tile_scores(q_i, k_j, head_dim)
            probs = jnp.where(mask_BxTxS[:, None, None], jnp.exp(scores - lse_BxKxGxT[..., None]), 0.0)
            dv_j = jnp.einsum("bkgts,btkgd->bskd", probs.astype(d_out.dtype), d_out_i,
                              preferred_element_type=jnp.float32)
            d_probs = jnp.einsum("btkgd,bskd->bkgts", d_out_i, v_j, preferred_element_type=jnp.float32)
            d_scores = (probs * (d_probs - delta_BxKxGxT[..., None]) / math.sqrt(head_dim)).astype(q.dtype)
            dq_i = dq_i + jnp.einsum("bkgts,bskd->btkgd", d_scores, k_j, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkgts,btkgd->bskd", d_scores, q_i, preferred_element_type=jnp.float32)
            # Masked keys of a shifted last block get exactly zero, so adding the whole block is exact.
            return dq_i, _add_block(dk, dk_j, start), _add_block(dv, dv_j, start)

        first, last = _key_block_range(rows, i, block_q, block_k, num_key_blocks, window)
        dq_i = jnp.zeros(q_i.shape, jnp.float32)
        with jax.named_scope(trips_scope(KEY_BLOCKS_SCOPE, key_blocks)):
            dq_i, dk, dv = jax.lax.fori_loop(first, last, key_block, (dq_i, dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * block_q, axis=1), dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, num_query_blocks, query_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


def _add_block(total, block, start):
    current = jax.lax.dynamic_slice_in_dim(total, start, block.shape[1], axis=1)
    return jax.lax.dynamic_update_slice_in_dim(total, current + block, start, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, rows, segments, key_segments, window, block_q, block_k, key_blocks):
    return _flash_forward(q, k, v, rows, segments, key_segments, window, block_q, block_k, key_blocks)


def _flash_fwd(q, k, v, rows, segments, key_segments, window, block_q, block_k, key_blocks):
    out, lse = _flash_forward(q, k, v, rows, segments, key_segments, window, block_q, block_k, key_blocks)
    return (out, lse), (q, k, v, rows, segments, key_segments, out, lse)


_flash.defvjp(_flash_fwd, _flash_backward)


# ---- cuDNN flash attention (GPU) ---------------------------------------------------------------


def _cudnn_applies(q_BxTxHxD, k_BxSxKxD, self_attention: bool) -> bool:
    """What can be decided at trace time: cuDNN's dtypes and head widths, and self-attention
    (its causal mask is aligned at the top-left corner, so queries at cache offsets fall back)."""
    head_dim = q_BxTxHxD.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and self_attention
        and q_BxTxHxD.shape[1] == k_BxSxKxD.shape[1]
        and q_BxTxHxD.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def _right_padded_single_segment(segments_BxT, key_segments_BxS):
    """bool scalar: every row is 1 ... 1 0 ... 0 with the same ids for queries and keys, the only
    segment layout cuDNN's per-row lengths can express (left padding and packing cannot)."""
    ones_or_zeros = jnp.all((segments_BxT == 0) | (segments_BxT == 1))
    non_increasing = jnp.all(segments_BxT[:, 1:] <= segments_BxT[:, :-1])
    return ones_or_zeros & non_increasing & jnp.all(segments_BxT == key_segments_BxS)


def _cudnn_or_chunked(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS, sliding_window,
                      block_size):
    """cuDNN where the segment layout allows it, chosen at run time (both branches compile)."""
    inputs = (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS)

    def cudnn(q, k, v, rows, segments, key_segments):
        lengths_B = jnp.sum(segments != 0, axis=1).astype(jnp.int32)
        # cuDNN zeroes padding queries; the dense path gives them the mean of all values.
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
            local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
            implementation="cudnn",
        )
        mean_v = jnp.mean(v.astype(jnp.float32), axis=1)
        mean_v_Bx1xHxD = jnp.repeat(mean_v, q.shape[2] // v.shape[2], axis=1)[:, None].astype(out.dtype)
        return jnp.where((segments == 0)[:, :, None, None], mean_v_Bx1xHxD, out)

    def chunked(*args):
        return chunked_attention(*args, sliding_window, block_size, self_attention=True)

    return jax.lax.cond(_right_padded_single_segment(segments_BxT, key_segments_BxS), cudnn, chunked, *inputs)


# ---- splash attention (Pallas TPU) -------------------------------------------------------------

# Splash tiles, and the segment-id tiles it broadcasts over them, are multiples of the TPU's lanes.
SPLASH_LANES = 128
# Padding ids handed to the kernel: splash pairs equal ids, so padding queries and padding keys
# (segment 0 here) get two different ids no real segment uses, and nobody sees a padding key.
_QUERY_PADDING_ID = int(np.iinfo(np.int32).min)
_KEY_PADDING_ID = _QUERY_PADDING_ID + 1
# Splash's kernels carry no cost estimate, so the plan would count them as 0 (46% of the 8B step's
# matmuls at 29k-token contexts, BUILD_NOTES). Its calls sit in a scope that names their FLOPs.
SPLASH_SCOPE = "splash_attention"
# Matmul FLOPs per (query, key) pair of a computed tile, per unit of head width: the forward runs
# q k^T and p v; the dq kernel q k^T, dO v^T and dS k; the dkv kernel q k^T, p^T dO, dO v^T, dS^T q.
_SPLASH_FLOPS_PER_PAIR = {"fwd": 4, "dq": 6, "dkv": 8}


def _context_mesh():
    """The mesh set with `jax.set_mesh` (an AbstractMesh while tracing), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _mesh_platform(mesh) -> str:
    """The platform the program is compiled for: the context mesh's devices' (an ahead-of-time
    compile for TPU devices from a CPU host is a TPU program), else the default backend's."""
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    return getattr(device, "platform", None) or jax.default_backend()


def _splash_applies(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, self_attention: bool, shared_segments: bool) -> bool:
    """What splash can take, decided at trace time: causal self-attention over the given tokens
    (queries against a cache sit at per-row offsets a static mask cannot express), one segment-id
    array for queries and keys (an empty row is then exactly a query in segment 0), and one
    float32 or bfloat16 dtype."""
    dtypes = {q_BxTxHxD.dtype, k_BxSxKxD.dtype, v_BxSxKxD.dtype}
    return (
        self_attention
        and shared_segments
        and q_BxTxHxD.shape[1] == k_BxSxKxD.shape[1]
        and len(dtypes) == 1
        and dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}
    )


def _splash_partition(mesh, batch: int, kv_heads: int):
    """(batch axes, head axes, idle axes) of the context mesh for splash's shard_map.

    The batch takes its logical-rule axes (data, fsdp) that divide it; the kv heads take theirs
    (tensor) and then the batch axes the batch could not use, so a microbatch smaller than the
    fsdp axis (4 sequences on 8 chips) is split by heads instead of repeated on every chip. Idle
    axes (size > 1, neither) hold whole copies of the computation. Axes already manual (inside a
    caller's shard_map) are not touched."""
    from opsd_jax.parallel import LOGICAL_AXIS_RULES

    sizes = dict(mesh.shape)
    free = _free_axes(mesh)
    used: list[str] = []

    def take(candidates, extent):
        chosen = _dividing_axes([a for a in candidates if a in free and a not in used], sizes, extent)
        used.extend(chosen)
        return chosen

    batch_axes = take(LOGICAL_AXIS_RULES["batch"], batch)
    head_axes = take((*LOGICAL_AXIS_RULES["kv_heads"], *LOGICAL_AXIS_RULES["batch"]), kv_heads)
    return batch_axes, head_axes, tuple(a for a in free if a not in used)


def _free_axes(mesh) -> list[str]:
    """Mesh axes of size > 1 that XLA partitions (not manual inside a caller's shard_map)."""
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    return [axis for axis, size in dict(mesh.shape).items() if size > 1 and axis not in manual]


def _splash_is_native(batch: int, kv_heads: int) -> bool:
    """Whether "auto" takes splash: a TPU program whose mesh splits splash's work without copies
    (or a single TPU device when no mesh is set)."""
    mesh = _context_mesh()
    if _mesh_platform(mesh) != "tpu":
        return False
    if mesh is None:
        return jax.device_count() == 1
    return not _splash_partition(mesh, batch, kv_heads)[2]


def _axes_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def splash_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segments_BxT, sliding_window,
                     block_size: int = DEFAULT_BLOCK_SIZE):
    """Causal (or sliding-window) self-attention with Pallas splash attention; [B, T, H, D].

    segments_BxT: int32 ids for queries and keys alike (0: padding), or None (one segment). Runs
    the Mosaic kernel on TPU and the same kernel in Pallas' interpreter elsewhere (tests). Under a
    context mesh (`jax.set_mesh`) it sits in a `shard_map` (Mosaic kernels are never partitioned
    by XLA): batch over data/fsdp, kv heads over tensor and the batch axes the batch left
    (`_splash_partition`); each shard holds whole sequences, so the forward and splash's own
    backward need no collective. Queries in segment 0 get the mean of all values, as in dense.
    """
    batch, length = q_BxTxHxD.shape[:2]
    kv_heads = k_BxTxKxD.shape[2]
    mesh = _context_mesh()
    # The generic interpreter, not pltpu.InterpretParams: the TPU interpreter (jax 0.10.2) pairs
    # the grid with the kernel's dimension semantics and fails on the grid dimension vmap adds.
    interpret = _mesh_platform(mesh) != "tpu"
    with_segments = segments_BxT is not None
    if not with_segments:
        segments_BxT = jnp.ones((batch, length), jnp.int32)  # shard_map takes arrays; unused then
    local = functools.partial(_splash_local, sliding_window=sliding_window, block_size=block_size,
                              with_segments=with_segments, interpret=interpret)
    if mesh is None or not _free_axes(mesh):
        return local(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segments_BxT)
    batch_axes, head_axes, _ = _splash_partition(mesh, batch, kv_heads)
    x_spec = PartitionSpec(_axes_entry(batch_axes), None, _axes_entry(head_axes), None)
    segments_spec = PartitionSpec(_axes_entry(batch_axes), None)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, segments_spec), out_specs=x_spec,
                            check_vma=False)
    return sharded(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segments_BxT.astype(jnp.int32))


def splash_block(length: int, block_size: int) -> int:
    """Splash's query and key tile: block_size rounded up to a multiple of 128, no longer than
    the sequence rounded up to one."""
    lanes = SPLASH_LANES
    return min(-(-block_size // lanes) * lanes, -(-length // lanes) * lanes)


def splash_flops(heads_mask, batch: int, head_dim: int, block: int) -> dict[str, int]:
    """Matmul FLOPs of one splash call over `batch` sequences with `heads_mask` (a MultiHeadMask;
    the same [block, block] tiles forward and backward), per kernel (fwd, dq, dkv): the tiles the
    mask leaves to compute times the kernel's matmuls. A tile the mask only partly covers costs a
    whole one; one it fully masks is skipped. Causal over nb blocks: nb (nb + 1) / 2 tiles a head."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info

    # The mask's block map as splash builds it (numpy, cached); [heads or 1 when the heads share
    # it, q blocks, kv blocks visited], 0 where a tile is skipped.
    info, _ = splash_attention_mask_info.process_mask(heads_mask, (block, block), head_shards=1, q_seq_shards=1)
    heads = len(heads_mask.masks)
    if info.block_mask is None:
        tiles = heads * (heads_mask.shape[1] // block) * (heads_mask.shape[2] // block)
    else:
        tiles = int(np.count_nonzero(info.block_mask)) * heads // info.block_mask.shape[0]
    return {phase: batch * tiles * block * block * head_dim * per_pair for phase, per_pair in _SPLASH_FLOPS_PER_PAIR.items()}


def _splash_local(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segments_BxT, *, sliding_window, block_size: int,
                  with_segments: bool, interpret):
    """splash_attention on one shard's whole sequences and its heads."""
    # Imported here so that Pallas loads only where splash runs.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, head_dim = q_BxTxHxD.shape
    kv_heads = k_BxTxKxD.shape[2]
    block = splash_block(length, block_size)
    padded = -(-length // block) * block
    pad = padded - length
    # Splash does not scale the scores; the dense path scales them by 1/sqrt(D) in float32. (In
    # bfloat16 the scaled q is rounded once more than dense's scores are.)
    q_BxTxHxD = (q_BxTxHxD.astype(jnp.float32) / math.sqrt(head_dim)).astype(q_BxTxHxD.dtype)

    def heads_major(x_BxTxNxD):
        return jnp.pad(jnp.swapaxes(x_BxTxNxD, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))

    q_BxHxPxD, k_BxKxPxD, v_BxKxPxD = (heads_major(x) for x in (q_BxTxHxD, k_BxTxKxD, v_BxTxKxD))
    shape = (padded, padded)
    if sliding_window is None:
        head_mask = splash.CausalMask(shape)
    else:
        head_mask = splash.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    blocks = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )
    heads_mask = splash.MultiHeadMask([head_mask] * heads)
    kernel = splash.make_splash_mha(heads_mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    if with_segments or pad:
        real_BxT = segments_BxT != 0 if with_segments else jnp.ones((batch, length), bool)
        ids_BxT = segments_BxT.astype(jnp.int32)
        query_ids_BxP = jnp.pad(jnp.where(real_BxT, ids_BxT, _QUERY_PADDING_ID), ((0, 0), (0, pad)),
                                constant_values=_QUERY_PADDING_ID)
        key_ids_BxP = jnp.pad(jnp.where(real_BxT, ids_BxT, _KEY_PADDING_ID), ((0, 0), (0, pad)),
                              constant_values=_KEY_PADDING_ID)
        call, inputs = (lambda q, k, v, qi, ki: kernel(q, k, v, splash.SegmentIds(q=qi, kv=ki)),
                        (q_BxHxPxD, k_BxKxPxD, v_BxKxPxD, query_ids_BxP, key_ids_BxP))
    else:
        call, inputs = (lambda q, k, v: kernel(q, k, v)), (q_BxHxPxD, k_BxKxPxD, v_BxKxPxD)
    with jax.named_scope(estimate_scope(SPLASH_SCOPE, splash_flops(heads_mask, batch, head_dim, block))):
        out_BxHxPxD = jax.vmap(call)(*inputs)
    out_BxTxHxD = jnp.swapaxes(out_BxHxPxD[:, :, :length], 1, 2).astype(v_BxTxKxD.dtype)
    if not with_segments:
        return out_BxTxHxD
    # A padding query sees no key; splash returns the mean of the masked keys of the blocks it
    # visited, the dense path the mean of all values. The where hands the kernel a zero cotangent
    # for those rows, so the kernel's own backward adds nothing for them.
    ones_T = jnp.ones((length,), v_BxTxKxD.dtype)
    mean_v_BxKxD = jnp.einsum("btkd,t->bkd", v_BxTxKxD, ones_T, preferred_element_type=jnp.float32) / length
    out_BxTxKxGxD = out_BxTxHxD.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    empty_BxTx1x1x1 = (segments_BxT == 0)[:, :, None, None, None]
    out_BxTxKxGxD = jnp.where(empty_BxTx1x1x1, mean_v_BxKxD[:, None, :, None, :].astype(v_BxTxKxD.dtype),
                              out_BxTxKxGxD)
    return out_BxTxKxGxD.reshape(batch, length, heads, head_dim)
