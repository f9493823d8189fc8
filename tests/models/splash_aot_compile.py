"""Ahead-of-time compiles of splash attention for a real TPU topology from a CPU host (needs libtpu).

    TPU_ACCELERATOR_TYPE=v5p-8 JAX_PLATFORMS=cpu python -m tests.models.splash_aot_compile decoder v5p:2x2x1
    TPU_ACCELERATOR_TYPE=v5p-16 JAX_PLATFORMS=cpu python -m tests.models.splash_aot_compile attention v5p:2x2x2 \\
        --mesh 1,8,1 --batch 8 --length 12288 --implementation splash

libtpu reads the accelerator type when it loads, so each topology needs its own process (run with
XLA_FLAGS unset: the tests' forced CPU device count must not reach it). `decoder`: forward and
backward of a small Qwen3 or OLMo-3 (head_dim 128, sliding layers) with attention "auto", under
`jax.set_mesh` on a multi-chip mesh. `attention`: forward and backward of one attention layer at
given widths, inputs placed as splash's shard_map takes them (the same placement for every
implementation, so the comparison is of the kernels). The last stdout line is a JSON report.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from opsd_jax.models import ModelConfig, attention, decoder
from opsd_jax.parallel import logical_sharding, make_mesh
from opsd_jax.plan import hlo_flops

_SPLASH_KERNEL = re.compile(r"splash_mha_(fwd|dq|dkv)")


def _mesh(topology_name: str, shape: tuple[int, int, int]):
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices
    return make_mesh(*shape, devices=devices)


def _compile(jitted, args, mesh) -> dict:
    """memory_analysis(), cost_analysis() and the Mosaic kernels of the compiled program. The
    tracing happens under the mesh, which is how attention finds it (and its platform)."""
    with jax.set_mesh(mesh):
        lowered = jitted.lower(*args)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    calls = [line for line in text.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    kinds = sorted(m.group(1) for line in calls for m in [_SPLASH_KERNEL.search(line)] if m)
    in_scope = hlo_flops.estimate_scope_prefix(attention.SPLASH_SCOPE)
    counted = hlo_flops.count(text, (in_scope,))
    return {
        "device_kind": mesh.devices.flat[0].device_kind,
        "mesh": dict(mesh.shape),
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "flops": float(cost.get("flops", 0.0)),
        "mosaic_custom_calls": len(calls),
        "splash_kernels": kinds,
        # the plan's loop-aware count; splash's kernels from the estimate scope around them
        "hlo_flops": counted.flops,
        "splash_flops": counted.by_scope.get(in_scope, 0.0),
        "opaque_kernels": counted.opaque_kernels,
    }


def tiny_config(arch: str, block_size: int) -> ModelConfig:
    fields = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False}
    if arch == "qwen3":
        fields.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    else:  # one sliding and one full layer, the window shorter than the sequence
        fields.update(model_type="olmo3", architectures=["Olmo3ForCausalLM"], sliding_window=160,
                      layer_types=["sliding_attention", "full_attention"], pad_token_id=1, eos_token_id=2)
    return ModelConfig.from_hf(fields, compute_dtype="bfloat16", remat=True, attention_block_size=block_size)


def decoder_report(topology: str, mesh_shape, arch: str, batch: int, length: int, block_size: int) -> dict:
    """The decoder's forward and backward (a loss over all logits), left-padded rows."""
    mesh = _mesh(topology, mesh_shape)
    config = tiny_config(arch, block_size)
    params = decoder.sharded_abstract_params(config, mesh)
    rows = logical_sharding(mesh, ("batch", None), (batch, length))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)

    def loss(params, tokens, mask):
        logits = decoder.forward(params, config, tokens, attention_mask=mask)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) * mask)

    report = _compile(jax.jit(jax.grad(loss)), (params, tokens, mask), mesh)
    # The layers are one scan over blocks of layer_period layers: the compiled program holds one
    # block's kernels, whatever the depth.
    report.update(program="decoder", arch=arch, batch=batch, length=length, layers=config.num_layers,
                  layers_per_block=decoder.layer_period(config))
    return report


def attention_flops(batch: int, heads: int, length: int, head_dim: int, block: int, implementation: str,
                    window: int | None = None) -> float:
    """Matmul FLOPs of one causal (sliding-window) attention forward + backward, counted from the
    tiles each backend visits (query block i against key blocks from the first its earliest query
    can see through i): splash 9 matmuls per tile (forward QK and PV; dK/dV kernel QK, dV, dP,
    dK; dQ kernel QK, dP, dQ), chunked 7 (forward QK, PV; backward QK, dV, dP, dQ, dK). Each
    matmul is 2 block^2 head_dim."""
    if implementation == "splash":
        block, matmuls = attention.splash_block(length, block), 9
    else:
        block, matmuls = min(block, length), 7
    blocks = -(-length // block)
    tiles = sum(i - (0 if window is None else max(0, (i * block - window + 1) // block)) + 1 for i in range(blocks))
    return float(matmuls * 2 * block * block * head_dim * tiles * heads * batch)


def attention_report(topology: str, mesh_shape, batch: int, length: int, heads: int, kv_heads: int,
                     head_dim: int, block_size: int, implementation: str, window: int | None) -> dict:
    """One attention layer's forward and backward, bfloat16, right-padded rows."""
    mesh = _mesh(topology, mesh_shape)
    batch_axes, head_axes, idle = attention._splash_partition(mesh, batch, kv_heads)
    entry = attention._axes_entry
    x = NamedSharding(mesh, PartitionSpec(entry(batch_axes), None, entry(head_axes), None))
    rows = NamedSharding(mesh, PartitionSpec(entry(batch_axes), None))
    q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16, sharding=x)
    kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16, sharding=x)
    segments = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)

    def loss(q, k, v, w, segments):
        out = attention.attend(q, k, v, query_segment_ids_BxT=segments, key_segment_ids_BxS=segments,
                               sliding_window=window, implementation=implementation, block_size=block_size)
        return jnp.sum(out.astype(jnp.float32) * w)

    jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), out_shardings=(x, x, x))
    report = _compile(jitted, (q, kv, kv, q, segments), mesh)
    chips = mesh.size
    per_chip = {"batch": batch // math.prod(mesh.shape[a] for a in batch_axes),
                "heads": heads // math.prod(mesh.shape[a] for a in head_axes)}
    report.update(program="attention", implementation=implementation, batch=batch, length=length, heads=heads,
                  kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, window=window, chips=chips,
                  batch_axes=batch_axes, head_axes=head_axes, idle_axes=idle, per_chip=per_chip,
                  design_flops_per_chip=attention_flops(per_chip["batch"], per_chip["heads"], length, head_dim,
                                                        block_size, implementation, window))
    return report


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("program", choices=["decoder", "attention"])
    parser.add_argument("topology")
    parser.add_argument("--mesh", default="1,2,2", help="data,fsdp,tensor")
    parser.add_argument("--arch", default="qwen3", choices=["qwen3", "olmo3"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=300)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--implementation", default="splash")
    args = parser.parse_args(argv[1:])
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    if args.program == "decoder":
        report = decoder_report(args.topology, mesh_shape, args.arch, args.batch, args.length, args.block_size)
    else:
        report = attention_report(args.topology, mesh_shape, args.batch, args.length, args.heads, args.kv_heads,
                                  args.head_dim, args.block_size, args.implementation, args.window)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv)
