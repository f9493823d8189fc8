"""Seconds per GiB of a trainer checkpoint save on this machine, through the trainer's own path.

A pytree shaped like a TrainState (float32 parameters and their two Adam moments, sharded over the
emulated devices as the trainer shards them over fsdp) is saved with
`opsd_jax.distill.checkpoints.checkpoint_manager` / `save_checkpoint` (the same manager options,
items and asynchronous save), timed from `save` to `wait_until_finished` returning: what a
preemption save costs before the process can exit. The rate it prints is what
`opsd_jax.launch.grace` sizes grace periods with (OPSD_SAVE_SECONDS_PER_GIB overrides it).
    python benchmarks/checkpoint_save.py [--gib 3] [--saves 3] [--devices 8] [--dir /tmp/ckpt-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=3.0, help="state size (params + 2 Adam moments)")
    parser.add_argument("--saves", type=int, default=3, help="saves timed (each a new step)")
    parser.add_argument("--devices", type=int, default=8, help="emulated CPU devices the state is sharded over")
    parser.add_argument("--dir", help="where to write (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from opsd_jax.config import RunConfig
    from opsd_jax.distill.checkpoints import checkpoint_manager, save_checkpoint
    from opsd_jax.parallel import make_mesh

    mesh = make_mesh(1, -1, 1)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
    # Layers of [4096, 4096] float32 (64 MiB each), as many as make a third of the state.
    rows, cols = 4096, 4096
    layer_bytes = rows * cols * 4
    layers = max(1, round(args.gib * 2**30 / 3 / layer_bytes))

    def leaves(seed):
        make = jax.jit(lambda key: jax.random.normal(key, (rows, cols), jnp.float32), out_shardings=sharding)
        return {f"layer_{i:03d}": make(jax.random.key(seed * 1000 + i)) for i in range(layers)}

    state = {"step": jnp.zeros((), jnp.int32), "params": leaves(1), "mu": leaves(2), "nu": leaves(3)}
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    jax.block_until_ready(state)
    root = args.dir or tempfile.mkdtemp(prefix="opsd-checkpoint-bench-")
    directory = os.path.join(root, "checkpoints")
    shutil.rmtree(directory, ignore_errors=True)
    manager = checkpoint_manager(directory, keep=1, every=1)
    config = RunConfig().to_dict()
    rates = []
    try:
        for step in range(1, args.saves + 1):
            started = time.perf_counter()
            save_checkpoint(manager, step, state, {"iterator": step}, config, force=True)
            returned = time.perf_counter()
            manager.wait_until_finished()
            seconds = time.perf_counter() - started
            rates.append(seconds / (total / 2**30))
            print(f"save {step}: {total / 2**30:.2f} GiB in {seconds:.2f} s (blocking part {returned - started:.2f} s)"
                  f" -> {rates[-1]:.3f} s/GiB", flush=True)
    finally:
        manager.close()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"checkpoint save: {statistics.median(rates):.3f} s/GiB (median of {len(rates)}; {total / 2**30:.2f} GiB, "
          f"{layers * 3} arrays over {len(jax.devices())} devices, jax {jax.__version__}, "
          f"{os.cpu_count()} CPUs, numpy {np.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
