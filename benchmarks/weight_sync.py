"""Weight sync from the trainer's fsdp shards to each process's sampler: WeightSync (one jitted
device-to-device reshard) against the former path (a full float32 host copy per process with
`process_allgather`, then placed on the sampler). Run on the 2-process loopback cluster:

    launch/local_cpu_cluster.sh -n 2 -d 4 -- .venv/bin/python benchmarks/weight_sync.py [--layers 8] [--hidden 1024]

Checks that both give bit-identical sampler weights and prints seconds per sync and the ratio
(process 0). `--check-only` skips the timing (the test uses it).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-only", action="store_true")
    args = parser.parse_args()

    from jax.experimental import multihost_utils

    from opsd_jax.models import ModelConfig, init_params
    from opsd_jax.parallel import initialize_distributed, make_mesh
    from opsd_jax.sampler import Engine, SamplerConfig
    from opsd_jax.sampler.engine import serving_mesh
    from opsd_jax.sampler.weight_sync import WeightSync

    initialize_distributed()
    heads = args.hidden // 128
    config = ModelConfig.from_hf(dict(
        model_type="qwen3", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
        head_dim=128, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    ), compute_dtype="bfloat16")
    train_mesh = make_mesh(1, -1, 1)  # every device of every process, as the trainer's default
    params = init_params(config, jax.random.key(0), mesh=train_mesh)
    engine = Engine(config, SamplerConfig(max_slots=2, max_sequence_length=64, prefill_buckets=(16,)),
                    mesh=serving_mesh(config, jax.local_devices()))
    sync = WeightSync(engine)

    def by_device_sync():
        return jax.block_until_ready(sync(params))

    def by_host_gather():
        return jax.block_until_ready(engine.load_params(multihost_utils.process_allgather(params, tiled=True)))

    fast, slow = by_device_sync(), by_host_gather()
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        for x, y in zip(a.addressable_shards, b.addressable_shards):
            np.testing.assert_array_equal(np.asarray(x.data), np.asarray(y.data))
    print(f"process {jax.process_index()}: weight sync equal to the host gather on {dict(engine.mesh.shape)}",
          flush=True)
    if args.check_only:
        return 0
    timings = {}
    for name, function in (("device", by_device_sync), ("host", by_host_gather)):
        best = float("inf")
        for _ in range(args.repeats):
            multihost_utils.sync_global_devices(name)
            start = time.perf_counter()
            function()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    if jax.process_index() == 0:
        size = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params)) / 2**30
        print(f"{jax.process_count()} processes x {jax.local_device_count()} devices, {size:.2f} GiB float32 params "
              f"({args.layers} layers, hidden {args.hidden}, vocab {args.vocab})")
        print(f"device-to-device WeightSync {timings['device']:.3f} s, host gather + place {timings['host']:.3f} s: "
              f"{timings['device'] / timings['host']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
