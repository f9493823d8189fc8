"""Throughput of one OPSD train step on this machine, with model FLOPs utilization.

The sampler benchmark's model shape (Qwen3 architecture, 8 layers, hidden 512, 8 heads, 4 kv
heads, head_dim 64, vocab 151,936, tied), float32 compute on CPU (no fast bf16 matmul here).
One step = student forward + backward, teacher forward on a longer (privileged) context, fused
JSD over the completion tokens, AdamW. MFU = model FLOPs / (step time x a float32 matmul rate
measured in the same run), where model FLOPs = 6 x (decoder-layer params) per student token +
2 x (decoder-layer params) per teacher token + the output head only where a loss needs it (the
completion tokens: 6 D V for the student, 2 D V for the teacher) + causal attention. Goal >= 40%.
    python benchmarks/train_step.py [--batch 4] [--prompt 128] [--completion 384] [--privileged 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of an n x n x n matmul under jit (best of `repeats`)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def build_step(layers: int, B: int, P: int, C: int, X: int, *, remat: bool, allocate: bool = True):
    """(jitted train step, state, batch, config, params) for the benchmark's model at `layers`
    depth: the trainer's `train_step` with donation, as the job jits it. Without `allocate`,
    params and state are ShapeDtypeStructs (enough to lower and compile)."""
    from opsd_jax.config import ObjectiveSection, OptimizerSection
    from opsd_jax.distill.train_step import Batch, StepSettings, TrainState, make_optimizer, train_step
    from opsd_jax.models import ModelConfig, init_params

    hf = dict(model_type="qwen3", vocab_size=151936, hidden_size=512, intermediate_size=1536,
              num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
              tie_word_embeddings=True, max_position_embeddings=4096)
    config = ModelConfig.from_hf(hf, compute_dtype="float32", remat=remat)
    params = init_params(config, jax.random.key(0)) if allocate else jax.eval_shape(
        lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    completion = rng.integers(0, 151_000, (B, C)).astype(np.int32)
    student_tokens = np.concatenate([rng.integers(0, 151_000, (B, P)), completion], 1).astype(np.int32)
    teacher_tokens = np.concatenate([rng.integers(0, 151_000, (B, P + X)), completion], 1).astype(np.int32)
    batch = Batch(
        student_tokens=student_tokens, student_mask=np.ones_like(student_tokens),
        teacher_tokens=teacher_tokens, teacher_mask=np.ones_like(teacher_tokens),
        student_index=np.broadcast_to(np.arange(P - 1, P - 1 + C, dtype=np.int32), (B, C)).copy(),
        teacher_index=np.broadcast_to(np.arange(P + X - 1, P + X - 1 + C, dtype=np.int32), (B, C)).copy(),
        targets=completion, lengths=np.full(B, C, np.int32), sampler_logprobs=np.full((B, C), -12.0, np.float32),
    )
    optimizer = make_optimizer(OptimizerSection(), 100)
    settings = StepSettings(student=config, teacher=config, objective=ObjectiveSection(kind="jsd", beta=0.5))
    def make_state(params):
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jax.tree.map(jnp.copy, params))

    state = make_state(params) if allocate else jax.eval_shape(make_state, params)
    step = jax.jit(lambda s, b: train_step(s, b, settings=settings, optimizer=optimizer), donate_argnums=(0,))
    return step, state, batch, config, params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--completion", type=int, default=384)
    parser.add_argument("--privileged", type=int, default=128, help="extra teacher prompt tokens")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    step, state, batch, config, params = build_step(args.layers, args.batch, args.prompt, args.completion,
                                                    args.privileged, remat=False)
    B, P, C, X = args.batch, args.prompt, args.completion, args.privileged
    student_length, teacher_length = P + C, P + X + C
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    rate = matmul_rate()

    n_params = sum(x.size for x in jax.tree.leaves(params))
    D, L, V = config.hidden_size, config.num_layers, config.vocab_size
    layer_params = sum(x.size for x in jax.tree.leaves(params["layers"]))
    q_width = config.num_heads * config.head_dim
    attention = lambda length: 4 * L * q_width * length * length / 2  # causal QK^T and PV  # noqa: E731
    student_flops = B * (6 * layer_params * student_length + 3 * attention(student_length) + 6 * D * V * C)
    teacher_flops = B * (2 * layer_params * teacher_length + attention(teacher_length) + 2 * D * V * C)
    flops = student_flops + teacher_flops
    tokens = B * student_length
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); {L} layers, "
          f"{n_params / 1e6:.0f}M params, batch {B}, student {student_length} / teacher {teacher_length} tokens")
    print("| measure | value |")
    print("|---|---|")
    print(f"| step time (median of {args.repeats}) | {seconds:.2f} s |")
    print(f"| student tokens/s | {tokens / seconds:.0f} |")
    print(f"| model FLOPs per step | {flops / 1e12:.2f} TFLOP |")
    print(f"| float32 matmul rate, same run | {rate / 1e9:.0f} GFLOP/s |")
    print(f"| MFU (goal >= 40%) | {flops / seconds / rate:.1%} |")
    print(f"| loss | {float(metrics['loss']):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
