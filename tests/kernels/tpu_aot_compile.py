"""Compile the pallas_tpu fused divergence (forward + backward) for a TPU topology on this host.

    TPU_ACCELERATOR_TYPE=v5litepod-4 JAX_PLATFORMS=cpu python -m tests.kernels.tpu_aot_compile v5e:2x2

Run as its own process: libtpu reads TPU_ACCELERATOR_TYPE when it loads. Shape: the benchmark's
(N=1024 tokens per device, H=512, V=151,936), bf16, tokens sharded over the `data` mesh axis.
Prints memory_analysis() and one JSON line with the figures.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from opsd_jax import kernels

N_PER_DEVICE, H, V = 1024, 512, 151_936


def compile_for(topology_name: str, beta: float = 0.5):
    topology = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
    devices = topology.devices
    mesh = Mesh(devices, ("data",))

    def local_loss(hs, ws, ht, wt):
        out = kernels.fused_linear_divergence(hs, ws, ht, wt, beta=beta, valid_vocab=151_669, impl="pallas_tpu", interpret=False)
        return jnp.mean(out.divergence)

    def step(hs, ws, ht, wt):
        loss, grads = jax.value_and_grad(local_loss, argnums=(0, 1))(hs, ws, ht, wt)
        return jax.lax.pmean(loss, "data"), grads[0], jax.lax.psum(grads[1], "data")

    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(P("data"), P(), P("data"), P()), out_specs=(P(), P("data"), P()), check_vma=False
    )
    n = N_PER_DEVICE * len(devices)
    args = (
        jax.ShapeDtypeStruct((n, H), jnp.bfloat16, sharding=NamedSharding(mesh, P("data"))),
        jax.ShapeDtypeStruct((H, V), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
        jax.ShapeDtypeStruct((n, H), jnp.bfloat16, sharding=NamedSharding(mesh, P("data"))),
        jax.ShapeDtypeStruct((H, V), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
    )
    lowered = jax.jit(sharded).lower(*args)
    hlo = lowered.as_text()
    compiled = lowered.compile()
    return devices[0].device_kind, compiled.memory_analysis(), hlo.count("tpu_custom_call")


def main(argv):
    topology_name = argv[1]
    kind, memory, mosaic_calls = compile_for(topology_name)
    print(memory)
    print(
        json.dumps(
            {
                "topology": topology_name,
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
