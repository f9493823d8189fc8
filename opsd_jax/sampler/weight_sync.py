"""Training weights to the samplers, device to device.

In a multi-process job every process decodes its own share of the rollouts on its own devices
(an Engine over a process-local mesh), while the training state is sharded over every process's
devices. One jitted transfer reshards the training parameters onto a global mesh laid out as
`[process, *local mesh]`, with each leaf's sampler sharding and nothing split over processes, so
each process ends up holding exactly the shards its local engine wants (already cast to the
compute dtype, one array per layer); those shards are then viewed as local arrays without a copy. The collectives run
over the interconnect; no host ever holds the model.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from opsd_jax.models import unstack_layers
from opsd_jax.parallel import make_mesh


def _process_meshes(local_mesh: Mesh) -> Mesh:
    """A global mesh whose leading axis is the process and whose row p is process p's local mesh,
    built the same way as this process's (so the layouts agree)."""
    shape = dict(local_mesh.shape)
    rows = []
    for process in range(jax.process_count()):
        devices = sorted((d for d in jax.devices() if d.process_index == process), key=lambda d: d.id)
        rows.append(make_mesh(shape["data"], shape["fsdp"], shape["tensor"], devices=devices).devices)
    return Mesh(np.stack(rows), ("process", *local_mesh.axis_names))


class WeightSync:
    """Callable: training params (global arrays) -> params placed for `engine` on this process.

    Every process must call it at the same point (it is one collective program). On a single
    process it is the engine's own placement.
    """

    def __init__(self, engine):
        self.engine = engine
        self.multi_process = jax.process_count() > 1
        if not self.multi_process:
            return
        local_shardings = engine.param_shardings
        global_mesh = _process_meshes(engine.mesh)
        mine = global_mesh.devices[jax.process_index()]
        if [d.id for d in mine.flat] != [d.id for d in engine.mesh.devices.flat]:
            raise ValueError("the sampler mesh must be this process's local devices, laid out by make_mesh")
        self._global_shardings = jax.tree.map(lambda s: NamedSharding(global_mesh, s.spec), local_shardings)
        dtype, config = engine.serving_dtype, engine.config
        self._transfer = jax.jit(lambda params: unstack_layers(jax.tree.map(lambda p: p.astype(dtype), params), config),
                                 out_shardings=self._global_shardings)

    def __call__(self, params):
        if not self.multi_process:
            return self.engine.load_params(params)
        replicated = self._transfer(params)
        return jax.tree.map(self._local_view, replicated, self.engine.param_shardings)

    @staticmethod
    def _local_view(array, sharding):
        return jax.make_array_from_single_device_arrays(array.shape, sharding,
                                                        [shard.data for shard in array.addressable_shards])
