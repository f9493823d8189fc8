"""TPU topologies as users name them, and their devices for ahead-of-time compilation.

Names follow the convention of MaxText and XPK (and of Cloud TPU accelerator types): `v5e-N` and
`v6e-N` count chips; `v4-N` and `v5p-N` count TensorCores, two per chip (v5p-64 is 32 chips in a
2x4x4 torus). Each chip is one JAX device (v4 and v5p run their two cores as one megacore).
Hosts hold four chips from 4 chips up, as on GKE's 4-chip machine types (ct5lp-hightpu-4t,
ct6e-standard-4t, ...) and in XPK: a v5e-8 or v6e-8 is two hosts. A Cloud TPU VM of that size is
one 8-chip host instead; the train step compiles the same, but its rollout sampler then spans all
8 chips where the plan gives it one host's 4.

libtpu learns the accelerator type from TPU_ACCELERATOR_TYPE when it loads, so a plan sets it
(`accelerator_environment`) before jax is imported, and one process plans one topology.
"""

from __future__ import annotations

import dataclasses
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str
    counts: str  # "chips" or "cores" in the name
    hbm_bytes: int  # per chip
    dims: int  # torus dimensions of a slice
    accelerator_prefix: str  # TPU_ACCELERATOR_TYPE spelling
    chips_per_host: int
    peak_bf16_flops: float  # per chip per second, the MXUs' bf16 peak


# HBM and bf16 peak per chip from Cloud TPU's system-architecture pages: v4 32 GiB, 275 TFLOP/s;
# v5e 16 GiB, 197; v5p 95 GiB, 459; v6e (Trillium) 32 GiB, 918.
GENERATIONS = {
    "v4": Generation("v4", "cores", 32 * GiB, 3, "v4", 4, 275e12),
    "v5e": Generation("v5e", "chips", 16 * GiB, 2, "v5litepod", 4, 197e12),
    "v5p": Generation("v5p", "cores", 95 * GiB, 3, "v5p", 4, 459e12),
    "v6e": Generation("v6e", "chips", 32 * GiB, 2, "v6e", 4, 918e12),
}
# Slice shapes by chip count: 2D for v5e / v6e, 3D tori for v4 / v5p.
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


class TopologyError(ValueError):
    """A topology name that is not one of the listed ones; the message lists the valid names."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as typed, e.g. "v5p-64"
    generation: Generation
    chips: int
    shape: tuple[int, ...]

    @property
    def jax_name(self) -> str:
        """The name `jax.experimental.topologies.get_topology_desc` takes, e.g. "v5p:2x4x4"."""
        return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        count = self.chips * (2 if self.generation.counts == "cores" else 1)
        return f"{self.generation.accelerator_prefix}-{count}"

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.generation.chips_per_host)

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes


def valid_names() -> list[str]:
    names = []
    for generation in GENERATIONS.values():
        shapes = SHAPES_2D if generation.dims == 2 else SHAPES_3D
        scale = 2 if generation.counts == "cores" else 1
        names += [f"{generation.name}-{chips * scale}" for chips in shapes]
    return names


def parse_topology(name: str) -> Topology:
    """A Topology from a name such as v5e-4, v6e-16, v5p-64 or v4-8; anything else is an error
    that lists the valid names."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name.strip().lower())
    generation = GENERATIONS.get(match.group(1)) if match else None
    if generation is not None:
        count = int(match.group(2))
        chips = count // 2 if generation.counts == "cores" and count % 2 == 0 else (
            count if generation.counts == "chips" else None)
        shapes = SHAPES_2D if generation.dims == 2 else SHAPES_3D
        if chips in shapes:
            return Topology(name.strip().lower(), generation, chips, shapes[chips])
    raise TopologyError(f"unknown TPU topology {name!r}; valid: {', '.join(valid_names())} "
                        "(v5e/v6e count chips, v4/v5p count TensorCores)")


def accelerator_environment(topology: Topology) -> dict[str, str]:
    """Environment libtpu needs before it loads to describe `topology` on a host without TPUs.
    Compiling needs no chip, so plans skip libtpu's one-process-per-host lock and run side by side."""
    return {"TPU_ACCELERATOR_TYPE": topology.accelerator_type, "JAX_PLATFORMS": "cpu",
            "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def chip_options(topology: Topology) -> dict:
    """How libtpu should lay out the chips: left alone it describes a v4 chip as two devices (one
    per TensorCore), while jobs run v4 and v5p as one megacore device per chip; and four chips per
    host (two hosts for v5e-8 / v6e-8, as GKE's 4-chip machines and XPK's defaults have it)."""
    return {"chip_config_name": "megacore" if topology.generation.counts == "cores" else "default",
            "chips_per_host_bounds": {1: (1, 1, 1), 4: (2, 2, 1)}[topology.chips_per_host]}


def topology_devices(topology: Topology, num_slices: int = 1):
    """The TPU devices of `num_slices` slices of `topology`, for lowering and compiling only."""
    from jax.experimental import topologies

    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology.jax_name,
                                               **chip_options(topology), **kwargs)
    devices = list(description.devices)
    expected = topology.chips * num_slices
    if len(devices) != expected:
        raise TopologyError(f"libtpu described {topology.name} x{num_slices} with {len(devices)} devices, "
                            f"expected {expected} (is TPU_ACCELERATOR_TYPE={topology.accelerator_type} set "
                            "before jax was imported?)")
    return devices


def host_devices(devices, topology: Topology, process_index: int = 0):
    """The devices of one host (a rollout or evaluation sampler runs on its host's chips).

    libtpu compiles a program for a subset of a slice's devices only when their ids are 0..n-1:
    one host of a v5e-16 or v6e-16 (a 4x4 grid) holds chips 0, 1, 4 and 5, and every program on
    them failed to compile ("Unexpected device_id 4 in replica group (0,1,2,3)"). Such a host is
    then described as a slice of its own with the same block of chips (2x2), which compiles the
    same per-chip program."""
    from jax.experimental import topologies

    local = [d for d in devices if d.process_index == process_index]
    if sorted(d.id for d in local) == list(range(len(local))):
        return local
    dims = topology.generation.dims
    block = [max(d.coords[axis] for d in local) - min(d.coords[axis] for d in local) + 1 for axis in range(dims)]
    name = f"{topology.generation.name}:{'x'.join(map(str, block))}"
    host = list(topologies.get_topology_desc(platform="tpu", topology_name=name, **chip_options(topology)).devices)
    if len(host) != len(local):
        raise TopologyError(f"libtpu described one host of {topology.name} ({name}) with {len(host)} devices, "
                            f"expected {len(local)}")
    return host


__all__ = ["GENERATIONS", "Topology", "TopologyError", "accelerator_environment", "chip_options", "host_devices",
           "parse_topology", "topology_devices", "valid_names"]
