"""Compile the pallas_tpu fused divergence (forward + backward) for a TPU topology on this host.

    TPU_ACCELERATOR_TYPE=v5litepod-4 JAX_PLATFORMS=cpu python -m tests.kernels.tpu_aot_compile v5e:2x2
    TPU_ACCELERATOR_TYPE=v5litepod-4 JAX_PLATFORMS=cpu python -m tests.kernels.tpu_aot_compile v5e:2x2 \\
        --mesh 1,2,2 --hidden 4096 --tokens-per-chip 8192 --head-dtype float32

Run as its own process: libtpu reads TPU_ACCELERATOR_TYPE when it loads. Default shape: the
benchmark's (N=1024 tokens per chip, H=512, V=151,936), bf16, tokens sharded over a `data` axis
in a hand-written shard_map. With --mesh: the public API's vocabulary-parallel form on a
(data, fsdp, tensor) mesh, inputs placed as the trainer places them (hidden rows over
data x fsdp, heads [H, V] over (fsdp, tensor)). Prints memory_analysis() and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opsd_jax import kernels

N_PER_DEVICE, H, V, VALID = 1024, 512, 151_936, 151_669


def _data_parallel(devices, beta, n_per_chip, width, head_dtype):
    """The kernel in a hand-written token-parallel shard_map (the head replicated)."""
    mesh = Mesh(devices, ("data",))

    def local_loss(hs, ws, ht, wt):
        out = kernels.fused_linear_divergence(hs, ws, ht, wt, beta=beta, valid_vocab=VALID, impl="pallas_tpu",
                                              interpret=False)
        return jnp.mean(out.divergence)

    def step(hs, ws, ht, wt):
        loss, grads = jax.value_and_grad(local_loss, argnums=(0, 1))(hs, ws, ht, wt)
        return jax.lax.pmean(loss, "data"), grads[0], jax.lax.psum(grads[1], "data")

    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(P("data"), P(), P("data"), P()), out_specs=(P(), P("data"), P()), check_vma=False
    )
    n = n_per_chip * len(devices)
    rows, head = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = (
        jax.ShapeDtypeStruct((n, width), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((width, V), head_dtype, sharding=head),
        jax.ShapeDtypeStruct((n, width), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((width, V), head_dtype, sharding=head),
    )
    return jax.jit(sharded), args


def _vocab_parallel(devices, beta, n_per_chip, width, head_dtype, mesh_shape):
    """The public API with the mesh, as the train step calls it."""
    from opsd_jax.parallel import make_mesh

    mesh = make_mesh(*mesh_shape, devices=devices)

    def loss(hs, ws, ht, wt, targets):
        out = kernels.fused_linear_divergence(hs, ws, ht, wt, beta=beta, valid_vocab=VALID, targets=targets,
                                              impl="pallas_tpu", interpret=False, mesh=mesh)
        return jnp.mean(out.divergence) - jnp.mean(out.student_logprob)

    n = n_per_chip * len(devices)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    head = NamedSharding(mesh, P("fsdp", "tensor"))
    args = (
        jax.ShapeDtypeStruct((n, width), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((width, V), head_dtype, sharding=head),
        jax.ShapeDtypeStruct((n, width), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((width, V), head_dtype, sharding=head),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rows),
    )
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), args


def compile_for(topology_name: str, beta: float = 0.5, *, mesh_shape=None, n_per_chip: int = N_PER_DEVICE,
                width: int = H, head_dtype=jnp.bfloat16):
    """(device kind, memory_analysis(), number of Mosaic custom calls in the lowered program)."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices
    if mesh_shape is None:
        jitted, args = _data_parallel(devices, beta, n_per_chip, width, head_dtype)
    else:
        jitted, args = _vocab_parallel(devices, beta, n_per_chip, width, head_dtype, mesh_shape)
    lowered = jitted.lower(*args)
    hlo = lowered.as_text()
    compiled = lowered.compile()
    return devices[0].device_kind, compiled.memory_analysis(), hlo.count("tpu_custom_call")


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("topology")
    parser.add_argument("--mesh", help="data,fsdp,tensor: the API's vocabulary-parallel form on this mesh")
    parser.add_argument("--hidden", type=int, default=H)
    parser.add_argument("--tokens-per-chip", type=int, default=N_PER_DEVICE)
    parser.add_argument("--head-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--beta", type=float, default=0.5)
    args = parser.parse_args(argv[1:])
    mesh_shape = None if args.mesh is None else tuple(int(x) for x in args.mesh.split(","))
    kind, memory, mosaic_calls = compile_for(
        args.topology, args.beta, mesh_shape=mesh_shape, n_per_chip=args.tokens_per_chip, width=args.hidden,
        head_dtype=jnp.dtype(args.head_dtype),
    )
    print(memory)
    print(
        json.dumps(
            {
                "topology": args.topology,
                "mesh": args.mesh,
                "hidden": args.hidden,
                "tokens_per_chip": args.tokens_per_chip,
                "head_dtype": args.head_dtype,
                "device_kind": kind,
                "mosaic_custom_calls": mosaic_calls,
                "temp_bytes": memory.temp_size_in_bytes,
                "argument_bytes": memory.argument_size_in_bytes,
                "output_bytes": memory.output_size_in_bytes,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv)
