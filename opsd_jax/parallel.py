"""Device mesh, the one logical-axis rules table, and multi-host initialization.

Every array that crosses a jit boundary gets its NamedSharding from `LOGICAL_AXIS_RULES` through
`logical_sharding`; no other code names a mesh axis or a device. A mesh is either explicit sizes
("data,fsdp,tensor") or "auto", whose rule is `auto_mesh_shape`.
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
    # Activations' sequence dimension takes the batch axes the batch could not use (a microbatch
    # with fewer sequences than data x fsdp shards), then tensor: sequence parallelism between
    # attentions, so no chip holds a whole microbatch's residual stream.
    "activation_seq": ("data", "fsdp", "tensor"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    # An untied output head [D, V] is stored as the divergence kernel reads it: its vocabulary
    # split over tensor and then fsdp, its model dimension whole. The kernel then sweeps each
    # chip's slice where it lies and accumulates its d/dW in the gradient's own buffer, where a
    # head split over fsdp in D is resharded in and its d/dW out every microbatch (BUILD_NOTES,
    # issue 12). Where fsdp does not divide the vocabulary (OLMo-3's 100,278), D takes fsdp as
    # "embed" does. A tied head is the embedding's transpose and keeps its layout.
    "head_vocab": ("tensor", "fsdp"),
    "head_embed": ("fsdp",),
    "norm": (),
    "layers": (),
    "cache_seq": (),
}


# The sampler's rules: decoding reads every weight every step, so weights are never split over
# fsdp (that would all-gather them every token); they split their heads over tensor (kv heads
# included, so each chip holds its heads' slice of the KV cache) and are replicated elsewhere.
SERVING_AXIS_RULES: dict[str, tuple[str, ...]] = {**LOGICAL_AXIS_RULES, "embed": (), "head_embed": (),
                                                   "head_vocab": ("tensor",)}

# Logical names whose dimensions take their mesh axes before the other dimensions of the same
# array do (see "head_vocab" above); the rest go in order.
CLAIMS_FIRST = ("head_vocab",)


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
    """Parses "data,fsdp,tensor" such as "2,2,2" or "1,-1,1" from a command line
    (config.mesh_sizes; "auto" is refused here)."""
    from opsd_jax.config import mesh_sizes

    try:
        sizes = mesh_sizes(text)
    except ValueError as error:
        raise ValueError(f"--mesh: {error}") from None
    if sizes is None:
        raise ValueError("mesh 'auto' is resolved from the model and the devices (parallel.auto_mesh_shape); "
                         "this command needs explicit sizes data,fsdp,tensor")
    return sizes


AUTO_MESH = "auto"
# Share of a chip's memory the training state (parameters, gradients, optimizer moments and a
# frozen teacher's copy) may take when auto_mesh_shape shrinks fsdp. The rest is for what the
# state does not include: activations and temporaries of one microbatch, the compiled code, and
# the rollout sampler's KV pool and weight copy that stay resident beside the step. In the v5p-16
# plan table (BUILD_NOTES) those take about three quarters of the tightest config that fits
# (Qwen3-8B dense: about 19 of 87 GiB per chip is state at fsdp 8).
STATE_MEMORY_SHARE = 0.25


def is_auto_mesh(text: str | None) -> bool:
    return isinstance(text, str) and text.strip().lower() == AUTO_MESH


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def auto_mesh_shape(devices_per_slice: int, *, num_heads: int, num_kv_heads: int, batch: int | None = None,
                    num_slices: int = 1, state_bytes: int | None = None,
                    memory_bytes: int | None = None) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes of one slice for `train.mesh: auto` (make_mesh then repeats
    the data axis once per slice, over DCN).

    batch: sequences per microbatch (train.batch_size / train.microbatches, all slices together);
    state_bytes: the training state (parameters, gradients, optimizer moments, teacher copy) of
    the whole model; memory_bytes: one device's memory (None: unknown, as on CPU).

    The rule, in order:

    1. Slices: only the data axis crosses slices. The DCN between slices is an order of magnitude
       slower than the chips' interconnect (ICI), and data parallelism sends one gradient
       reduction per step over it, where fsdp would gather every layer's weights and tensor
       parallelism reduce every layer's activations.
    2. tensor: the batch axis splits over data x fsdp (LOGICAL_AXIS_RULES); when a slice has more
       chips than its share of a microbatch's sequences, a mesh axis that does not divide the
       batch is left out and the chips beyond it compute the same sequences again. Tensor
       parallelism takes those chips: the smallest tensor size dividing both the attention and
       the KV heads (each chip then attends with whole heads, and the rollout sampler splits its
       KV heads the same way) that leaves the fewest copies of each sequence. With enough
       sequences that is 1: tensor parallelism costs two activation reductions per layer, which
       FSDP's weight gathers avoid.
    3. fsdp and data share the rest: fsdp only as far as the model needs it, the smallest size
       that keeps the training state within STATE_MEMORY_SHARE of a device's memory, and data
       for the chips left (each data replica sends one gradient reduction per step instead of a
       weight gather per layer and microbatch). With the memory unknown, or no size small enough,
       fsdp takes all of them (ZeRO-3: the least memory per chip).
    """
    for name, value in (("devices_per_slice", devices_per_slice), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("num_slices", num_slices)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"auto mesh: {name} must be a positive integer, got {value!r}")
    n = devices_per_slice
    # Sequences one slice holds per microbatch: the slices split the batch first (data over DCN).
    per_slice = None if not batch else batch // num_slices if batch % num_slices == 0 else batch

    def repeated(tensor: int) -> int:
        batch_chips = n // tensor
        return 1 if per_slice is None else batch_chips // math.gcd(batch_chips, per_slice)

    heads = [t for t in _divisors(n) if num_heads % t == 0 and num_kv_heads % t == 0]
    tensor = min(heads, key=lambda t: (repeated(t), t))
    rest = n // tensor
    fsdp = rest
    if state_bytes is not None and memory_bytes:
        fitting = [f for f in _divisors(rest) if state_bytes / (f * tensor) <= STATE_MEMORY_SHARE * memory_bytes]
        if fitting:
            fsdp = fitting[0]
    return rest // fsdp, fsdp, tensor


def auto_mesh(devices=None, **facts) -> Mesh:
    """make_mesh over `devices` (default: all) with auto_mesh_shape's sizes for their slices;
    `facts` are auto_mesh_shape's keyword arguments other than num_slices."""
    devices = list(jax.devices() if devices is None else devices)
    slices = _slice_groups(devices)
    shape = auto_mesh_shape(len(devices) // len(slices), num_slices=len(slices), **facts)
    return make_mesh(*shape, devices=devices)


def device_memory_bytes(device) -> int | None:
    """One device's memory as its runtime reports it (TPU and GPU: bytes_limit); None where the
    backend reports none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: dict[str, tuple[str, ...]] | None = None,
) -> PartitionSpec:
    """Maps logical dimension names to a PartitionSpec.

    With `shape` and `mesh`, a mesh axis is dropped from a dimension it does not divide (that
    dimension is then replicated over it) and no mesh axis is used twice: a tiny or odd-sized
    tensor stays correct on any mesh instead of failing to place. Dimensions named in
    CLAIMS_FIRST choose their axes first.
    """
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    used: set[str] = set()
    spec: list = [None] * len(logical_axes)
    for dim in sorted(range(len(logical_axes)), key=lambda d: logical_axes[d] not in CLAIMS_FIRST):
        name = logical_axes[dim]
        if name is None:
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
        spec[dim] = None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen)
    return PartitionSpec(*spec)


def constrain(x, logical_axes: Sequence[str | None], rules: dict[str, tuple[str, ...]] | None = None):
    """`x` constrained to the sharding its logical dimension names give on the context mesh
    (`jax.sharding.use_abstract_mesh`, which the train step enters); `x` unchanged without one.

    Activations need it: XLA's propagation alone, with FSDP weights split over the same axis the
    batch is, gathers the microbatch onto every chip and repeats its whole forward and backward
    there. An axis that does not divide its dimension is left out (`logical_to_spec`).
    """
    mesh = jax.sharding.get_abstract_mesh()
    # Inside a shard_map (manual axes) each shard is already placed.
    if (mesh.empty or not any(size > 1 for size in mesh.shape.values())
            or any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh, rules))


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
