"""Paged attention as a Pallas TPU (Mosaic) kernel that reads the sampler's own page pools.

The pools keep the layout every writer uses, `[P, N, K, D]` (P pages of N rows, K kv heads), so
nothing is transposed or copied per call: the kernel gets the pools in HBM (`memory_space=ANY`)
and copies whole pages `[N, K, D]` (all of its kv heads at once, each page read once per query
block) into a double-buffered VMEM block `[Q, N, K, D]`, page numbers read from the sequence's
page-table row in SMEM. In VMEM the block is read as `[Q * N * K, D]` rows, kv head h being every
K-th row from row h: a strided load for 32-bit pools, and for bfloat16 (two rows packed in one
32-bit word) the pair of heads (2i, 2i + 1) as the low and high halves of each word, which is how
`jax.experimental.pallas.ops.tpu.ragged_paged_attention` reads its interleaved k/v pool.

Neither stock kernel fits: `paged_attention` wants `[K, P, N, D]` pools and has no sliding
window; `ragged_paged_attention` wants k and v interleaved in one `[P, N, 2K, D]` pool and reads
a sliding-window sequence from its first page. Here reading starts at the first visible page: a
query block whose lowest row is `lo` and highest `hi` reads pages `(lo - window + 1) // N ..
hi // N` only (pages behind the window, released to the null page, are never read), and pages of
the last block past `hi // N` are not copied at all. A query block whose lowest row lies in the
null page (an idle slot, whose table is all null pages while its position keeps stepping, or a
prefill block wholly past the prompt) reads nothing and returns zeros; the gather loop instead
attends over the null page there (up to the idle slot's row: a full-length read per idle slot).

Queries are regrouped per kv head in the wrapper (`[B, K, T * G, D]`, a copy of the queries,
never of the pools), so every tile is a plain `[T * G, D] x [R, D]` matmul. Online softmax in
float32; the matmul operands are in the pool's dtype (bfloat16 pools: bfloat16 operands with
float32 accumulation, as splash does). Serves decode (T = 1) and prefill chunks (T = chunk).

Mosaic kernels are never partitioned by XLA: under a mesh the call sits in a `shard_map`, kv
heads over the axes `kv_heads` takes (tensor), sequences over those `batch` takes (data, fsdp) in
`parallel.SERVING_AXIS_RULES`, which is how the engine places pools and slots. The mesh is the
context mesh (`jax.set_mesh`) or, without one, the mesh carried by the pool's sharding (the
engine's jits are traced without a context mesh; their arguments' shardings name the mesh, and
its devices' platform is the compile target, so an ahead-of-time compile for TPU from a CPU host
takes the kernel).

Shape letters: B sequences, T queries each, H query heads, K kv heads (per shard inside the
kernel), G = H / K, D head width, P pages, N rows per page, M table entries per sequence, Q pages
per key block, R = Q * N key rows per block, Tq queries per query block, X = Tq * G query rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

NULL_PAGE = 0
LANES = 128
# VMEM bounds (Mosaic's default scoped VMEM is 16 MiB on v4/v5): query rows (queries x group) per
# query block, and the same summed over the block's kv heads (the float32 statistics and the
# accumulator are [K, X, 128] each); bytes of one key block of one pool, of which four are held
# (k and v, double-buffered).
QUERY_ROWS_PER_BLOCK = 256
QUERY_HEAD_ROWS_PER_BLOCK = 2048
KEY_BLOCK_BYTES = 2**20


def context_mesh(*arrays):
    """The mesh set with `jax.set_mesh`, else the (abstract) mesh in the first of `arrays` whose
    sharding names one, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    for x in arrays:
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        if mesh is not None and not mesh.empty:
            return mesh
    return None


def mesh_platform(mesh) -> str:
    """The platform the program is compiled for: the mesh's devices', else the default backend's."""
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    platform = getattr(device, "platform", None)
    if platform is None and mesh is not None:
        devices = getattr(mesh, "devices", None)
        if devices is not None and getattr(devices, "size", 0):
            platform = devices.flat[0].platform
    return platform or jax.default_backend()


def supported(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD) -> str | None:
    """None if the kernel takes these shapes and dtypes, else why not (decided at trace time)."""
    heads, head_dim = q_BxTxHxD.shape[2:]
    _, page_size, kv_heads, pool_head_dim = k_pool_PxNxKxD.shape
    if k_pool_PxNxKxD.shape != v_pool_PxNxKxD.shape or k_pool_PxNxKxD.dtype != v_pool_PxNxKxD.dtype:
        return "k and v pools differ in shape or dtype"
    if pool_head_dim != head_dim or heads % kv_heads:
        return "query and pool widths do not match"
    if k_pool_PxNxKxD.dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"pool dtype {k_pool_PxNxKxD.dtype} (float32 or bfloat16 only)"
    if page_size % 8:
        return f"page size {page_size} (a multiple of 8 rows)"
    return None


def _local_heads_supported(kv_heads: int, dtype) -> bool:
    """bfloat16 rows of a head are read in pairs of heads, so an odd local head count > 1 is not."""
    return jnp.dtype(dtype).itemsize == 4 or kv_heads == 1 or kv_heads % 2 == 0


def _partition(mesh, batch: int, kv_heads: int):
    """(batch axes, kv-head axes) of the mesh's free axes, as the serving rules place slots and pools."""
    from opsd_jax.parallel import SERVING_AXIS_RULES

    sizes = dict(mesh.shape)
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    free = [a for a, s in sizes.items() if s > 1 and a not in manual]

    def take(candidates, extent):
        chosen = []
        for axis in candidates:
            if axis in free and extent % (math.prod(sizes[a] for a in chosen) * sizes[axis]) == 0:
                chosen.append(axis)
        return tuple(chosen)

    head_axes = take(SERVING_AXIS_RULES["kv_heads"], kv_heads)
    batch_axes = take([a for a in SERVING_AXIS_RULES["batch"] if a not in head_axes], batch)
    return batch_axes, head_axes, free


def _entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def applies(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD) -> bool:
    """Whether "auto" takes the kernel: a TPU program, shapes the kernel takes, and a mesh it can
    be split over (or a single TPU device when there is no mesh)."""
    if supported(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD) is not None:
        return False
    mesh = context_mesh(k_pool_PxNxKxD, q_BxTxHxD)
    if mesh_platform(mesh) != "tpu":
        return False
    kv_heads = k_pool_PxNxKxD.shape[2]
    if mesh is None:
        return jax.device_count() == 1 and _local_heads_supported(kv_heads, k_pool_PxNxKxD.dtype)
    _, head_axes, _ = _partition(mesh, q_BxTxHxD.shape[0], kv_heads)
    local = kv_heads // math.prod(dict(mesh.shape)[a] for a in head_axes)
    return _local_heads_supported(local, k_pool_PxNxKxD.dtype)


def paged_attention(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD, page_table_BxM, rows_BxT, *,
                    sliding_window: int | None = None, block_rows: int = 256, interpret=None):
    """`opsd_jax.models.paged.paged_attention` as a Pallas TPU kernel; same arguments and result.

    q: [B, T, H, D]; pools: [P, N, K, D] float32 or bfloat16; page_table: int32[B, M]; rows:
    int32[B, T], the cache row each query sits at (it sees rows <= its own, and > row - window on
    sliding layers). Returns [B, T, H, D] in the pool's dtype; 0 for a query block whose lowest
    row lies in the null page (no sequence's query; see the module docstring). `block_rows`: key
    rows per block,
    rounded to whole pages and to a multiple of 128. `interpret`: None runs the Mosaic kernel
    when compiling for TPU and Pallas' interpreter elsewhere (tests).
    """
    why = supported(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD)
    if why is not None:
        raise ValueError(f"pallas_tpu paged attention: {why}")
    batch, kv_heads = q_BxTxHxD.shape[0], k_pool_PxNxKxD.shape[2]
    mesh = context_mesh(k_pool_PxNxKxD, q_BxTxHxD)
    if interpret is None:
        interpret = mesh_platform(mesh) != "tpu"
    local = functools.partial(_paged_attention_local, sliding_window=sliding_window, block_rows=block_rows,
                              interpret=interpret)
    rows_BxT = rows_BxT.astype(jnp.int32)
    page_table_BxM = page_table_BxM.astype(jnp.int32)
    if mesh is None:
        return local(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD, page_table_BxM, rows_BxT)
    batch_axes, head_axes, free = _partition(mesh, batch, kv_heads)
    if not free:
        return local(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD, page_table_BxM, rows_BxT)
    heads, batch_entry = _entry(head_axes), _entry(batch_axes)
    q_spec = PartitionSpec(batch_entry, None, heads, None)
    pool_spec = PartitionSpec(None, None, heads, None)
    seq_spec = PartitionSpec(batch_entry, None)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, pool_spec, pool_spec, seq_spec, seq_spec),
                            out_specs=q_spec, check_vma=False)
    return sharded(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD, page_table_BxM, rows_BxT)


def pages_per_block(block_rows: int, page_size: int, page_bytes: int) -> int:
    """Q: whole pages covering at least `block_rows` rows, Q * N a multiple of 128 lanes, fewer
    (down to the least such Q) while a block of `page_bytes` pages exceeds KEY_BLOCK_BYTES."""
    step = LANES // math.gcd(page_size, LANES)
    pages = max(1, -(-max(block_rows, LANES) // page_size))
    pages = -(-pages // step) * step
    while pages > step and pages * page_bytes > KEY_BLOCK_BYTES:
        pages -= step
    return pages


def query_block(length: int, groups: int, kv_heads: int, dtype) -> int:
    """Tq: queries per query block. X = Tq * G rows must be a multiple of the dtype's sublane tile
    unless the block is all the queries."""
    sublanes = 8 * (4 // jnp.dtype(dtype).itemsize)
    rows = max(sublanes, min(QUERY_ROWS_PER_BLOCK, QUERY_HEAD_ROWS_PER_BLOCK // kv_heads))
    per_block = max(1, rows // groups)
    if length <= per_block:
        return length
    multiple = sublanes // math.gcd(sublanes, groups)
    return max(multiple, per_block // multiple * multiple)


def _paged_attention_local(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD, page_table_BxM, rows_BxT, *,
                           sliding_window, block_rows: int, interpret):
    """The kernel on one shard's sequences and kv heads."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    batch, length, heads, head_dim = q_BxTxHxD.shape
    num_pages, page_size, kv_heads, _ = k_pool_PxNxKxD.shape
    table_pages = page_table_BxM.shape[1]
    groups = heads // kv_heads
    dtype = k_pool_PxNxKxD.dtype
    if not _local_heads_supported(kv_heads, dtype):
        raise ValueError(f"pallas_tpu paged attention: {kv_heads} kv heads per shard in {dtype} (1 or even)")
    pages = pages_per_block(block_rows, page_size, page_size * kv_heads * head_dim * jnp.dtype(dtype).itemsize)
    q_len = query_block(length, groups, kv_heads, dtype)
    padded = -(-length // q_len) * q_len
    query_blocks = padded // q_len
    x_rows = q_len * groups

    # Padded queries repeat the last row: they widen no block's page range.
    rows_pad_BxT = jnp.pad(rows_BxT, ((0, 0), (0, padded - length)), mode="edge")
    rows_BxNqxTq = rows_pad_BxT.reshape(batch, query_blocks, q_len)
    lo_flat = jnp.min(rows_BxNqxTq, axis=2).reshape(-1)
    hi_flat = jnp.max(rows_BxNqxTq, axis=2).reshape(-1)
    # The row each query row (query t, group g at t * G + g) sits at, across the lanes.
    rows_BxXxL = jnp.broadcast_to(jnp.repeat(rows_pad_BxT, groups, axis=1)[:, :, None],
                                  (batch, padded * groups, LANES))
    scaled = (q_BxTxHxD.astype(jnp.float32) / math.sqrt(head_dim)).astype(dtype)
    q_BxKxXxD = jnp.pad(scaled.reshape(batch, length, kv_heads, groups, head_dim),
                        ((0, 0), (0, padded - length), (0, 0), (0, 0), (0, 0)))
    q_BxKxXxD = jnp.transpose(q_BxKxXxD, (0, 2, 1, 3, 4)).reshape(batch, kv_heads, padded * groups, head_dim)

    # Each sequence's table row is copied to SMEM per grid step (a whole table, B x M entries,
    # need not fit there); rows padded to a multiple of 1024 entries, which Mosaic takes as the
    # block of a flat array.
    table_lanes = -(-table_pages // 1024) * 1024
    table_flat = jnp.pad(page_table_BxM, ((0, 0), (0, table_lanes - table_pages)),
                         constant_values=NULL_PAGE).reshape(-1)
    # One kv head per shard: XLA stores such a pool with the unit head dimension outside the
    # page's rows ({3,1,2,0}), so [P, N, D] is the same buffer (a bitcast), while the row-major
    # [P, N, 1, D] the kernel would otherwise take costs a copy of the pool per call.
    page_shape = (page_size, head_dim) if kv_heads == 1 else (page_size, kv_heads, head_dim)
    k_pool, v_pool = (pool.reshape(num_pages, *page_shape) for pool in (k_pool_PxNxKxD, v_pool_PxNxKxD))
    kernel = functools.partial(_kernel, page_size=page_size, pages=pages, table_pages=table_pages,
                               kv_heads=kv_heads, window=sliding_window, x_rows=x_rows)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, query_blocks),
        in_specs=[
            pl.BlockSpec((table_lanes,), lambda b, i, *_: (b,), memory_space=pltpu.SMEM),
            pl.BlockSpec((None, kv_heads, x_rows, head_dim), lambda b, i, *_: (b, 0, i, 0)),
            pl.BlockSpec((None, x_rows, LANES), lambda b, i, *_: (b, i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((None, kv_heads, x_rows, head_dim), lambda b, i, *_: (b, 0, i, 0)),
        scratch_shapes=[
            pltpu.VMEM((2, pages, *page_shape), dtype),
            pltpu.VMEM((2, pages, *page_shape), dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
            pltpu.VMEM((kv_heads, x_rows, LANES), jnp.float32),
            pltpu.VMEM((kv_heads, x_rows, LANES), jnp.float32),
            pltpu.VMEM((kv_heads, x_rows, head_dim), jnp.float32),
        ],
    )
    # An upper bound for XLA's scheduler and cost_analysis(): every query sees the table's full
    # length (or its window); the live lengths are not known when compiling.
    itemsize = jnp.dtype(dtype).itemsize
    visible = min(table_pages * page_size, sliding_window + padded if sliding_window else table_pages * page_size)
    cost = pl.CostEstimate(
        flops=4 * batch * padded * heads * visible * head_dim,
        transcendentals=batch * padded * heads * visible,
        bytes_accessed=2 * batch * query_blocks * visible * kv_heads * head_dim * itemsize
        + 2 * q_BxKxXxD.size * itemsize,
    )
    out_BxKxXxD = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q_BxKxXxD.shape, dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        cost_estimate=cost,
        name="paged_attention_tpu",
    )(lo_flat, hi_flat, table_flat, q_BxKxXxD, rows_BxXxL, k_pool, v_pool)
    out = out_BxKxXxD.reshape(batch, kv_heads, padded, groups, head_dim)
    out = jnp.transpose(out, (0, 2, 1, 3, 4))[:, :length]
    return out.reshape(batch, length, heads, head_dim)


def _kernel(lo_ref, hi_ref, table_ref, q_ref, rows_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sems, m_ref, l_ref,
            acc_ref, *, page_size: int, pages: int, table_pages: int, kv_heads: int, window, x_rows: int):
    """One (sequence, query block): online softmax over its visible key blocks, all kv heads."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    b, i = pl.program_id(0), pl.program_id(1)
    flat = b * pl.num_programs(1) + i
    lo, hi = lo_ref[flat], hi_ref[flat]
    first_row = jnp.int32(0) if window is None else jnp.maximum(lo - window + 1, 0)
    first_page = first_row // page_size
    last_page = hi // page_size  # inclusive
    # A block whose lowest query row lies in the null page holds no sequence's query (an idle
    # slot, or padding past a prompt): nothing is read and its outputs are 0.
    own_index = lo // page_size
    own_page = jnp.where(own_index < table_pages, table_ref[jnp.minimum(own_index, table_pages - 1)], NULL_PAGE)
    num_blocks = jnp.where(own_page == NULL_PAGE, 0, (last_page - first_page) // pages + 1)
    key_rows = pages * page_size
    head_dim = acc_ref.shape[-1]
    dtype = k_buf.dtype

    def copies(j, slot):
        """(condition, k copy, v copy) of each page of key block j."""
        out = []
        for p in range(pages):
            index = first_page + j * pages + p
            page = table_ref[jnp.minimum(index, table_pages - 1)]
            out.append((index <= last_page,
                        pltpu.make_async_copy(k_hbm.at[page], k_buf.at[slot, p], sems.at[0, slot]),
                        pltpu.make_async_copy(v_hbm.at[page], v_buf.at[slot, p], sems.at[1, slot])))
        return out

    def each_needed_copy(j, slot, action: str):
        """Calls `action` ("start" or "wait") on the k and v copies of key block j's needed pages."""
        for needed, k_copy, v_copy in copies(j, slot):
            @pl.when(needed)
            def _(k_copy=k_copy, v_copy=v_copy):
                getattr(k_copy, action)()
                getattr(v_copy, action)()

    def start(j, slot):
        each_needed_copy(j, slot, "start")

    def wait(j, slot):
        each_needed_copy(j, slot, "wait")

    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(num_blocks > 0)
    def _():
        start(0, 0)


    rows_XxL = rows_ref[...]
    rows_XxR = rows_XxL if key_rows == LANES else jnp.tile(rows_XxL, (1, key_rows // LANES))

    def heads_of(buf):
        """The block's rows of each kv head: list of [R, D] in the pool's dtype."""
        if kv_heads == 1:
            return [buf.reshape(key_rows, head_dim)[...]]
        flat_ref = buf.reshape(key_rows * kv_heads, head_dim)
        if jnp.dtype(dtype).itemsize == 4:
            return [flat_ref[h::kv_heads, :] for h in range(kv_heads)]
        # bfloat16: word row w holds rows 2w (low half) and 2w + 1 (high half), so the word rows
        # of heads 2c and 2c + 1 are every (K / 2)-th from row c.
        words_ref = flat_ref.bitcast(jnp.uint32)
        out = []
        for c in range(kv_heads // 2):
            words = words_ref[c::kv_heads // 2, :] if kv_heads > 2 else words_ref[...]
            out.append(pltpu.bitcast(words << 16, jnp.float32).astype(dtype))
            out.append(pltpu.bitcast(words & jnp.uint32(0xFFFF0000), jnp.float32).astype(dtype))
        return out

    def body(j, carry):
        slot = j % 2

        @pl.when(j + 1 < num_blocks)
        def _():
            start(j + 1, 1 - slot)

        wait(j, slot)
        base = (first_page + j * pages) * page_size
        key_XxR = base + jax.lax.broadcasted_iota(jnp.int32, (x_rows, key_rows), 1)
        visible_XxR = key_XxR <= rows_XxR
        if window is not None:
            visible_XxR &= key_XxR > rows_XxR - window
        # Rows of pages not copied (past the last page) hold stale VMEM: zero their values, as
        # a zero probability times a NaN would not be zero.
        loaded_Rx1 = base + jax.lax.broadcasted_iota(jnp.int32, (key_rows, 1), 0) <= hi
        ks, vs = heads_of(k_buf.at[slot]), heads_of(v_buf.at[slot])
        for h in range(kv_heads):
            q_XxD = q_ref[h]
            scores = jax.lax.dot_general(q_XxD, ks[h], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
            scores = jnp.where(visible_XxR, scores, -jnp.inf)
            m_prev = m_ref[h]
            m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
            safe = jnp.where(jnp.isneginf(m_next), 0.0, m_next)
            safe_XxR = safe if key_rows == LANES else jnp.tile(safe, (1, key_rows // LANES))
            probs = jnp.exp(scores - safe_XxR)
            alpha = jnp.exp(m_prev - safe)
            l_ref[h] = alpha * l_ref[h] + jnp.sum(probs, axis=1, keepdims=True)
            m_ref[h] = m_next
            v_RxD = jnp.where(loaded_Rx1, vs[h], jnp.zeros((), dtype))
            pv = jnp.dot(probs.astype(dtype), v_RxD, preferred_element_type=jnp.float32)
            acc_ref[h] = _lanes(alpha, head_dim) * acc_ref[h] + pv
        return carry

    jax.lax.fori_loop(0, num_blocks, body, 0)
    for h in range(kv_heads):
        total = jnp.maximum(l_ref[h], jnp.finfo(jnp.float32).tiny)
        o_ref[h] = (acc_ref[h] / _lanes(total, head_dim)).astype(o_ref.dtype)


def _lanes(x_XxL, width: int):
    """A lane-replicated [X, 128] statistic as [X, width]."""
    if width == LANES:
        return x_XxL
    if width % LANES == 0:
        return jnp.tile(x_XxL, (1, width // LANES))
    return x_XxL[:, :width]
