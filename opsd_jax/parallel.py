"""Device mesh, the one logical-axis rules table, and multi-host initialization.

Every array that crosses a jit boundary gets its NamedSharding from `LOGICAL_AXIS_RULES` through
`logical_sharding`; no other code names a mesh axis or a device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes it may be split over, in order of preference. Parameters shard their
# model dimension over fsdp (ZeRO-3 style) and their head/mlp/vocab dimension over tensor;
# activations shard the batch over data and fsdp.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": (),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "norm": (),
    "layers": (),
    "cache_seq": (),
}


# The sampler's rules: decoding reads every weight every step, so weights are never split over
# fsdp (that would all-gather them every token); they split their heads over tensor (kv heads
# included, so each chip holds its heads' slice of the KV cache) and are replicated elsewhere.
SERVING_AXIS_RULES: dict[str, tuple[str, ...]] = {**LOGICAL_AXIS_RULES, "embed": ()}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices=None) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh; at most one size may be -1 and takes what is left.

    With the default arguments every device goes to fsdp. Devices of several TPU slices (a
    multi-slice job: their `slice_index` differs) take the sizes per slice, and the slices repeat
    the data axis: on 2 slices of 16 chips, (1, -1, 1) is a (2, 16, 1) mesh whose data axis
    crosses the data-center network (DCN) and carries only the data-parallel gradient reduction,
    while fsdp and tensor stay on each slice's own interconnect. `opsd-jax plan --num-slices N`
    compiles for this same mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    slices = _slice_groups(devices)
    per_slice = len(devices) // len(slices)
    where = f"{per_slice} devices per slice" if len(slices) > 1 else f"{len(devices)} devices"
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} must be a positive integer or -1, got {size!r}")
    inferred = [name for name, size in sizes.items() if size == -1]
    if len(inferred) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {inferred}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if inferred:
        if per_slice % known:
            raise ValueError(
                f"{where} cannot be split into mesh axes {sizes}: {per_slice} is not divisible by {known}"
            )
        sizes[inferred[0]] = per_slice // known
    total = math.prod(sizes.values())
    if total != per_slice:
        raise ValueError(f"mesh {sizes} needs {total} devices, but {where} are available")
    shape = tuple(sizes[name] for name in MESH_AXES)
    if len(slices) == 1:
        return Mesh(_device_grid(shape, devices), MESH_AXES)
    try:
        device_grid = mesh_utils.create_hybrid_device_mesh(shape, (len(slices), 1, 1), devices=devices)
    except (ValueError, NotImplementedError, AssertionError, AttributeError):
        device_grid = np.concatenate([_device_grid(shape, group) for group in slices], axis=0)
    return Mesh(device_grid, MESH_AXES)


def _device_grid(shape, devices) -> np.ndarray:
    try:
        return mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # mesh_utils knows physical topologies of TPUs; anything else gets the plain order.
        return np.asarray(devices, dtype=object).reshape(shape)


def _slice_groups(devices) -> list[list]:
    """The devices per TPU slice (`slice_index`; devices without one form a single slice)."""
    indices = sorted({getattr(d, "slice_index", None) or 0 for d in devices})
    groups = [[d for d in devices if (getattr(d, "slice_index", None) or 0) == i] for i in indices]
    if len({len(g) for g in groups}) > 1:
        raise ValueError(f"the slices hold different numbers of devices: {[len(g) for g in groups]}")
    return groups


def parse_mesh_shape(text: str) -> tuple[int, int, int]:
    """Parses "data,fsdp,tensor" such as "2,2,2" or "1,-1,1" from a command line."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"--mesh must be three comma-separated sizes data,fsdp,tensor; got {text!r}")
    try:
        return tuple(int(p) for p in parts)  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"--mesh sizes must be integers; got {text!r}") from None


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: dict[str, tuple[str, ...]] | None = None,
) -> PartitionSpec:
    """Maps logical dimension names to a PartitionSpec.

    With `shape` and `mesh`, a mesh axis is dropped from a dimension it does not divide (that
    dimension is then replicated over it) and no mesh axis is used twice: a tiny or odd-sized
    tensor stays correct on any mesh instead of failing to place.
    """
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        chosen = []
        extent = None if shape is None else shape[dim]
        for axis in rules[name]:
            if axis in used:
                continue
            if mesh is not None and extent is not None:
                factor = math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]
                if extent % factor:
                    continue
            chosen.append(axis)
        if mesh is not None:
            chosen = [a for a in chosen if mesh.shape[a] > 1]
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def logical_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
    rules: dict[str, tuple[str, ...]] | None = None,
) -> NamedSharding:
    """NamedSharding of one array from its logical dimension names."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def tree_shardings(mesh: Mesh, logical_tree, shape_tree, rules: dict[str, tuple[str, ...]] | None = None):
    """NamedShardings for a pytree, given matching pytrees of logical-axes tuples and shapes.

    `logical_tree` leaves are tuples of names; `shape_tree` leaves are arrays or
    ShapeDtypeStructs (anything with `.shape`).
    """
    return jax.tree.map(
        lambda axes, leaf: logical_sharding(mesh, axes, leaf.shape, rules),
        logical_tree,
        shape_tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x),
    )


def initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize` when the environment describes a multi-process job.

    Cloud TPU pods and SLURM are detected by JAX itself (it reads their metadata); a local
    emulated cluster sets OPSD_COORDINATOR, OPSD_NUM_PROCESSES and OPSD_PROCESS_ID. Returns True
    when this process joined a multi-process job.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator = os.environ.get("OPSD_COORDINATOR")
    if coordinator:
        try:
            num_processes = int(os.environ["OPSD_NUM_PROCESSES"])
            process_id = int(os.environ["OPSD_PROCESS_ID"])
        except KeyError as missing:
            raise ValueError(
                f"OPSD_COORDINATOR is set, so {missing.args[0]} must be set too"
            ) from None
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
        return True
    # OPSD_JAX_DISTRIBUTED=1: a Cloud TPU VM slice, whose environment names no peers (JAX reads
    # them from the TPU metadata); `opsd-jax launch tpu-vm / queued` sets it on multi-host slices.
    auto_markers = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OPSD_JAX_DISTRIBUTED")
    if any(os.environ.get(m) for m in auto_markers) and os.environ.get("OPSD_SINGLE_PROCESS") != "1":
        hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        if "TPU_WORKER_HOSTNAMES" in os.environ and len(hostnames.split(",")) <= 1:
            return False  # a single-host TPU VM needs no coordination
        jax.distributed.initialize()
        return True
    return False
