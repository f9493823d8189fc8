"""Attention memory and speed: dense (float32 [T, S] scores) against the chunked online softmax.

For causal self-attention over one sequence (B=1, H query heads over K kv heads, head width 128,
float32) prints the compiled temporary bytes of forward + backward (`memory_analysis()` needs only
a compile, so dense is compiled at lengths it could never run), and wall-time ratios chunked /
dense measured in the same run. A third column compiles the alternative backward the design
weighed: the same online softmax differentiated by JAX with `jax.checkpoint` per key block.

    python benchmarks/attention.py [--lengths 4096 8192 16384 32768] [--time-lengths 2048 8192]
                                   [--heads 4] [--kv-heads 2] [--block 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from opsd_jax.models import attention

HEAD_DIM = 128


def loss_fn(implementation: str, block: int):
    """Scalar loss whose gradient runs the backward of one attention call."""

    def loss(q, k, v, weights):
        if implementation == "checkpointed":
            out = checkpointed_online_softmax(q, k, v, block)
        else:
            out = attention.attend(q, k, v, implementation=implementation, block_size=block)
        return jnp.sum(out.astype(jnp.float32) * weights)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def checkpointed_online_softmax(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, block: int):
    """The rejected alternative: a scan over key blocks with each step under jax.checkpoint and
    JAX's own backward (every step's running statistics and accumulator are saved)."""
    batch, length, heads, head_dim = q_BxTxHxD.shape
    kv_heads = k_BxSxKxD.shape[2]
    q = q_BxTxHxD.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    rows = jnp.broadcast_to(jnp.arange(length), (batch, length))
    segments = jnp.ones((batch, length), jnp.int32)

    @jax.checkpoint
    def step(state, j):
        running_max, running_sum, acc = state
        k_j = jax.lax.dynamic_slice_in_dim(k_BxSxKxD, j * block, block, axis=1)
        v_j = jax.lax.dynamic_slice_in_dim(v_BxSxKxD, j * block, block, axis=1)
        mask = attention.attention_mask(rows, segments, segments[:, :block], None, key_start=j * block)
        scores = jnp.where(mask[:, None, None], attention._tile_scores(q, k_j, head_dim), -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(scores - new_max[..., None])
        acc = acc * correction[..., None] + jnp.einsum("bkgts,bskd->bkgtd", probs, v_j)
        return (new_max, running_sum * correction + probs.sum(-1), acc), None

    shape = (batch, kv_heads, heads // kv_heads, length)
    init = (jnp.full(shape, -1e30), jnp.zeros(shape), jnp.zeros((*shape, head_dim)))
    (_, running_sum, acc), _ = jax.lax.scan(step, init, jnp.arange(k_BxSxKxD.shape[1] // block))
    out = acc / running_sum[..., None]
    return jnp.einsum("bkgtd->btkgd", out).reshape(batch, length, heads, head_dim)


def inputs(length: int, heads: int, kv_heads: int, concrete: bool):
    shapes = [(1, length, heads, HEAD_DIM), (1, length, kv_heads, HEAD_DIM), (1, length, kv_heads, HEAD_DIM),
              (1, length, heads, HEAD_DIM)]
    if not concrete:
        return [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def temp_bytes(implementation: str, length: int, args) -> int:
    compiled = loss_fn(implementation, args.block).lower(*inputs(length, args.heads, args.kv_heads, False)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def seconds(implementation: str, length: int, args) -> float:
    """Best of `repeats` timed runs after one compile-and-warm-up run."""
    fn = loss_fn(implementation, args.block)
    values = inputs(length, args.heads, args.kv_heads, True)
    jax.block_until_ready(fn(*values))
    best = math.inf
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*values))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--time-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--block", type=int, default=attention.DEFAULT_BLOCK_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, B=1 H={args.heads} K={args.kv_heads} D={HEAD_DIM} float32, "
          f"causal, forward + backward, block {args.block}")

    mib = 2**20
    print("\ncompiled temporaries (MiB)")
    print(f"{'T':>7} {'dense':>11} {'chunked':>9} {'checkpointed':>13} {'dense/chunked':>14}")
    chunked_by_length = {}
    for length in args.lengths:
        dense = temp_bytes("dense", length, args)
        chunked = chunked_by_length[length] = temp_bytes("chunked", length, args)
        checkpointed = temp_bytes("checkpointed", length, args)
        print(f"{length:>7} {dense / mib:>11.1f} {chunked / mib:>9.1f} {checkpointed / mib:>13.1f} "
              f"{dense / chunked:>14.1f}")
    shortest, longest = min(chunked_by_length), max(chunked_by_length)
    print(f"chunked growth T={shortest} -> {longest}: "
          f"{chunked_by_length[longest] / chunked_by_length[shortest]:.2f}x (goal <= 10x)")

    print("\nwall time, forward + backward (s, best of repeats)")
    print(f"{'T':>7} {'dense':>8} {'chunked':>8} {'chunked/dense':>14}")
    for length in args.time_lengths:
        dense = seconds("dense", length, args)
        chunked = seconds("chunked", length, args)
        print(f"{length:>7} {dense:>8.3f} {chunked:>8.3f} {chunked / dense:>14.2f}")


if __name__ == "__main__":
    main()
