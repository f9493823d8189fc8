"""The Pallas TPU paged-attention kernel (`opsd_jax.models.paged_tpu`) in Pallas' interpreter on
CPU against the gather loop of `paged.paged_attention` and a float64 dense oracle, in its
shard_map form on 2 CPU devices, and compiled ahead of time for v5p through libtpu at the
sampler's real widths (run as a module, it prints the compile report as JSON:

    env -u XLA_FLAGS JAX_PLATFORMS=cpu TPU_ACCELERATOR_TYPE=v5p-8 ALLOW_MULTIPLE_LIBTPU_LOAD=1 \\
        python -m tests.models.test_paged_tpu v5p:2x2x1 --mesh 1,1,4 --slots 64
)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = 16
NULL = 0


def _case(rng, *, lengths, kv_heads, groups, head_dim=128, queries=1, window=None, idle=(), ahead=1,
          spare=3, null_fill=None, ahead_fill=None):
    """A pool holding each sequence's rows 0 .. length - 1 in random pages, the page table, the
    query rows (the last `queries` rows of each sequence) and the contiguous keys and values for
    the oracle. Sliding windows release the pages wholly behind every query's window (table entry
    -> null page); `ahead` pages past the last row are held (as the engine holds a sequence's next
    pages), filled with `ahead_fill` if given; idle sequences' tables are all null pages while
    their queries sit at rows as a live one's would (an idle slot's position keeps stepping)."""
    batch = len(lengths)
    table_pages = max(-(-l // PAGE) for l in lengths) + ahead + 1
    num_pages = 1 + batch * table_pages + spare
    k_pool = rng.normal(size=(num_pages, PAGE, kv_heads, head_dim))
    v_pool = rng.normal(size=(num_pages, PAGE, kv_heads, head_dim))
    if null_fill is not None:
        k_pool[NULL] = v_pool[NULL] = null_fill
    table = np.full((batch, table_pages), NULL, np.int32)
    free = list(rng.permutation(np.arange(1, num_pages)))
    keys, values, rows = [], [], np.zeros((batch, queries), np.int32)
    for b, length in enumerate(lengths):
        k = rng.normal(size=(length, kv_heads, head_dim))
        v = rng.normal(size=(length, kv_heads, head_dim))
        keys.append(k)
        values.append(v)
        rows[b] = np.arange(length - queries, length)
        if b in idle:
            continue
        held = -(-length // PAGE) + ahead
        for m in range(min(held, table_pages)):
            page = free.pop()
            table[b, m] = page
            chunk = slice(m * PAGE, min((m + 1) * PAGE, length))
            if chunk.start < length:
                k_pool[page, : chunk.stop - chunk.start] = k[chunk]
                v_pool[page, : chunk.stop - chunk.start] = v[chunk]
            elif ahead_fill is not None:
                k_pool[page] = v_pool[page] = ahead_fill
        if window is not None:
            first_visible = max(int(rows[b].min()) - window + 1, 0)
            table[b, : first_visible // PAGE] = NULL
    q = rng.normal(size=(batch, queries, kv_heads * groups, head_dim))
    return {"q": q, "k_pool": k_pool, "v_pool": v_pool, "table": table, "rows": rows, "keys": keys,
            "values": values}


def _oracle(case, window, live):
    """float64 dense attention of each live sequence's queries over its contiguous rows."""
    q = case["q"]
    _, queries, heads, head_dim = q.shape
    kv_heads = case["k_pool"].shape[2]
    out = np.zeros(q.shape)
    for b in live:
        k, v = case["keys"][b], case["values"][b]
        for t in range(queries):
            row = case["rows"][b, t]
            lo = 0 if window is None else max(row - window + 1, 0)
            for h in range(heads):
                kk, vv = k[lo: row + 1, h // (heads // kv_heads)], v[lo: row + 1, h // (heads // kv_heads)]
                s = kk @ q[b, t, h] / np.sqrt(head_dim)
                p = np.exp(s - s.max())
                out[b, t, h] = p @ vv / p.sum()
    return out


def _run(case, dtype, window, implementation, block_rows=256):
    import jax
    import jax.numpy as jnp

    from opsd_jax.models import paged

    args = (jnp.asarray(case["q"], dtype), jnp.asarray(case["k_pool"], dtype), jnp.asarray(case["v_pool"], dtype),
            jnp.asarray(case["table"]), jnp.asarray(case["rows"]))
    fn = jax.jit(lambda *a: paged.paged_attention(*a, sliding_window=window, block_rows=block_rows,
                                                  implementation=implementation))
    return np.asarray(fn(*args).astype(jnp.float32))


@pytest.mark.parametrize("kv_heads,groups", [(2, 4), (1, 4), (4, 1), (3, 2)])
@pytest.mark.parametrize("window", [None, 40])
def test_decode_equals_gather_and_oracle_float32(rng, kv_heads, groups, window):
    """Decode (T = 1): ragged live lengths (one page, a partial page, several key blocks), an idle
    slot, GQA groups of Qwen3 (4) and OLMo-3 (1), odd local head counts, sliding windows with
    the pages behind them released."""
    lengths = [300, 1, 17, 45, 33]
    case = _case(rng, lengths=lengths, kv_heads=kv_heads, groups=groups, window=window, idle=(4,))
    got = _run(case, np.float32, window, "pallas_tpu")
    gather = _run(case, np.float32, window, "gather")
    live = [0, 1, 2, 3]
    np.testing.assert_allclose(got[live], gather[live], atol=2e-5, rtol=2e-5)
    assert (got[4] == 0).all()  # an idle slot's query sits in the null page: nothing is read
    np.testing.assert_allclose(got[live], _oracle(case, window, live)[live], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kv_heads,groups,window", [(2, 4, None), (1, 4, None), (4, 1, 40), (2, 4, 100)])
def test_decode_bfloat16_pools(rng, kv_heads, groups, window):
    """bfloat16 pools and queries (the sampler's dtype; two heads' rows per 32-bit word)."""
    import jax.numpy as jnp

    case = _case(rng, lengths=[300, 2, 129, 64], kv_heads=kv_heads, groups=groups, window=window, idle=(3,))
    got = _run(case, jnp.bfloat16, window, "pallas_tpu")
    gather = _run(case, jnp.bfloat16, window, "gather")
    live = [0, 1, 2]
    np.testing.assert_allclose(got[live], gather[live], atol=3e-2, rtol=3e-2)
    assert (got[3] == 0).all()
    oracle = _oracle(case, window, live)
    # the inputs rounded to bfloat16 are what both see; the kernel's matmul operands are bf16
    assert np.max(np.abs(got[live] - oracle[live])) < 0.1
    assert np.mean(np.abs(got[live] - oracle[live])) < 1e-2


@pytest.mark.parametrize("queries,window,block_rows", [(37, None, 256), (100, 64, 128), (70, None, 512)])
def test_prefill_chunk_equals_gather_and_oracle(rng, queries, window, block_rows):
    """Prefill chunks (T > 1, several query blocks with padding when T * G > 256), windows shorter
    than the chunk, key blocks of 8, 16 and 32 pages."""
    case = _case(rng, lengths=[350, 120], kv_heads=2, groups=4, queries=queries, window=window)
    got = _run(case, np.float32, window, "pallas_tpu", block_rows)
    gather = _run(case, np.float32, window, "gather", block_rows)
    np.testing.assert_allclose(got, gather, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got, _oracle(case, window, [0, 1]), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 40])
def test_reads_no_page_behind_the_window_or_past_the_last_row(rng, window):
    """NaN in the null page (released pages map there) and in the pages held ahead of each
    sequence: a single read of either would make the output NaN (0 * NaN in the value sum), so
    equality with the oracle shows the kernel starts at the first visible page and stops at the
    last row's page. (The gather loop reads both, masked, and is NaN here.)"""
    case = _case(rng, lengths=[300, 45, 200], kv_heads=2, groups=4, window=window, null_fill=np.nan,
                 ahead=3, ahead_fill=np.nan)
    got = _run(case, np.float32, window, "pallas_tpu")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _oracle(case, window, [0, 1, 2]), atol=2e-5, rtol=2e-5)


def test_auto_takes_gather_off_tpu_and_names_bad_implementations(rng):
    import jax
    import jax.numpy as jnp

    from opsd_jax.models import paged

    case = _case(rng, lengths=[20], kv_heads=2, groups=2, head_dim=8)
    args = tuple(jnp.asarray(case[name], jnp.float32) for name in ("q", "k_pool", "v_pool")) + (
        jnp.asarray(case["table"]), jnp.asarray(case["rows"]))
    jaxpr = str(jax.make_jaxpr(lambda *a: paged.paged_attention(*a))(*args))
    assert "pallas_call" not in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda *a: paged.paged_attention(*a, implementation="pallas_tpu"))(*args))
    assert "pallas_call" in jaxpr
    with pytest.raises(ValueError, match="paged attention implementation 'splash'"):
        paged.paged_attention(*args, implementation="splash")


@pytest.mark.parametrize("mesh_shape", [(1, 1, 2), (2, 1, 1)])
@pytest.mark.parametrize("context", [False, True])
def test_shard_map_on_two_devices(rng, cpu_devices, mesh_shape, context):
    """Under the sampler's placement on 2 CPU devices (kv heads over tensor, or slots over data),
    with the mesh set by `jax.set_mesh` or found in the pools' sharding, the kernel runs per
    shard in a shard_map and equals the gather loop."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from opsd_jax.models import paged
    from opsd_jax.parallel import make_mesh

    mesh = make_mesh(*mesh_shape, devices=cpu_devices[:2])
    window = 40
    case = _case(rng, lengths=[100, 7, 60, 33], kv_heads=4, groups=2, window=window, idle=(3,))
    heads = "tensor" if mesh_shape[2] > 1 else None
    batch = "data" if mesh_shape[0] > 1 else None
    pool = NamedSharding(mesh, PartitionSpec(None, None, heads, None))
    seq = NamedSharding(mesh, PartitionSpec(batch, None))
    qs = NamedSharding(mesh, PartitionSpec(batch, None, heads, None))
    args = (jax.device_put(jnp.asarray(case["q"], jnp.float32), qs),
            jax.device_put(jnp.asarray(case["k_pool"], jnp.float32), pool),
            jax.device_put(jnp.asarray(case["v_pool"], jnp.float32), pool),
            jax.device_put(jnp.asarray(case["table"]), seq), jax.device_put(jnp.asarray(case["rows"]), seq))

    def run(implementation):
        fn = jax.jit(lambda *a: paged.paged_attention(*a, sliding_window=window, implementation=implementation))
        if context:
            with jax.set_mesh(mesh):
                lowered = fn.lower(*args)
        else:
            lowered = fn.lower(*args)
        return lowered, np.asarray(lowered.compile()(*args))

    lowered, got = run("pallas_tpu")
    assert "sdy.manual_computation" in lowered.as_text() or "shard_map" in lowered.as_text()
    _, gather = run("gather")
    np.testing.assert_allclose(got[:3], gather[:3], atol=2e-5, rtol=2e-5)
    assert (got[3] == 0).all()  # the idle slot


# ---- ahead-of-time compile for TPU (needs libtpu) ------------------------------------------------

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu absent: install the [tpu] extra")


def _aot(accelerator, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               TPU_ACCELERATOR_TYPE=accelerator)
    env.pop("XLA_FLAGS", None)  # the tests' forced CPU device count must not reach libtpu
    done = subprocess.run([sys.executable, "-m", "tests.models.test_paged_tpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    print("\n".join(lines))
    return json.loads(lines[-1])


@needs_libtpu
@pytest.mark.parametrize("slots", [32, 64])
def test_qwen3_8b_decode_compiles_for_v5p_without_pool_copies(slots):
    """Qwen3-8B decode attention at the evaluation sampler's shapes (L = 38,912 + 1,024 rows,
    pages of 16, the default pool of (slots + 1) full-length sequences) with its 8 kv heads over
    4 v5p chips: one Mosaic kernel per call reading the pools in place (no pool-sized copy,
    temporaries of a few hundred KiB), and "auto" takes it from the pools' mesh alone."""
    report = _aot("v5p-8", "v5p:2x2x1", "--mesh", "1,1,4", "--slots", str(slots))
    assert report["device_kind"].startswith("TPU v5")
    assert report["paged_kernels"] == 1 and report["pool_sized_ops"] == []
    assert report["temp_bytes"] < 4 * 2**20, report["temp_bytes"]


@needs_libtpu
@pytest.mark.parametrize("mesh,kv_heads,extra", [
    ("1,1,8", 8, ()),  # one kv head per chip: the pool's {3,1,2,0} layout is read as [P, N, D]
    ("2,1,4", 8, ()),  # slots over data as well
    ("1,1,8", 32, ("--window", "4096", "--length", "8192")),  # OLMo-3 sliding layers
    ("1,1,8", 8, ("--slots", "1", "--queries", "1024", "--pages", "20000")),  # a prefill chunk
])
def test_other_placements_compile_for_v5p_16(mesh, kv_heads, extra):
    report = _aot("v5p-16", "v5p:2x2x2", "--mesh", mesh, "--kv-heads", str(kv_heads), *extra)
    assert report["paged_kernels"] == 1 and report["pool_sized_ops"] == []
    assert report["temp_bytes"] < 4 * 2**20, report["temp_bytes"]


def aot_report(argv=None) -> dict:
    """Compiles paged attention (implementation "auto" unless --implementation) for a TPU topology
    from this host; memory_analysis() and whether the pools were copied."""
    import time

    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    from opsd_jax.models import paged
    from opsd_jax.parallel import make_mesh

    parser = argparse.ArgumentParser()
    parser.add_argument("topology")
    parser.add_argument("--mesh", default="1,1,4")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--length", type=int, default=38_912 + 1_024)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--pages", type=int, default=None, help="default: (slots + 1) full sequences + null")
    parser.add_argument("--implementation", default="auto")
    a = parser.parse_args(argv)
    devices = topologies.get_topology_desc(platform="tpu", topology_name=a.topology).devices
    mesh = make_mesh(*map(int, a.mesh.split(",")), devices=devices)
    table_pages = -(-a.length // PAGE)
    pages = a.pages or (a.slots + 1) * table_pages + 1
    batch = "data" if mesh.shape["data"] > 1 and a.slots % mesh.shape["data"] == 0 else None
    pool_sharding = NamedSharding(mesh, PartitionSpec(None, None, "tensor", None))
    seq_sharding = NamedSharding(mesh, PartitionSpec(batch, None))
    q_sharding = NamedSharding(mesh, PartitionSpec(batch, None, "tensor", None))
    pool = jax.ShapeDtypeStruct((pages, PAGE, a.kv_heads, a.head_dim), jnp.bfloat16, sharding=pool_sharding)
    args = (jax.ShapeDtypeStruct((a.slots, a.queries, a.heads, a.head_dim), jnp.bfloat16, sharding=q_sharding),
            pool, pool, jax.ShapeDtypeStruct((a.slots, table_pages), jnp.int32, sharding=seq_sharding),
            jax.ShapeDtypeStruct((a.slots, a.queries), jnp.int32, sharding=seq_sharding))

    def attend(q, k, v, table, rows):
        return paged.paged_attention(q, k, v, table, rows, sliding_window=a.window, implementation=a.implementation)

    start = time.time()
    compiled = jax.jit(attend, out_shardings=q_sharding).lower(*args).compile()
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    calls = [line for line in text.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    local = (pages, PAGE, a.kv_heads // mesh.shape["tensor"], a.head_dim)
    # any op producing a pool-sized buffer (a relayout or copy) other than the parameters
    pool_ops = [line.strip()[:240] for line in text.splitlines()
                if re.search(r"= \w+\[" + ",".join(map(str, local)) + r"\]", line)
                and " parameter(" not in line and "get-tuple-element" not in line]
    return {"device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "pages": pages,
            "table_pages": table_pages, "pool_bytes_per_chip": 2 * int(np.prod(local)) * 2,
            "temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes, "mosaic_custom_calls": len(calls),
            "paged_kernels": sum("paged_attention_tpu" in line for line in calls), "pool_sized_ops": pool_ops,
            "compile_s": round(time.time() - start, 1)}


if __name__ == "__main__":
    print(json.dumps(aot_report()))
