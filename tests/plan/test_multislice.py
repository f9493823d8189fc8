"""Multi-slice: the slices repeat train.mesh's data axis over DCN, in the plan and in the trainer's
own make_mesh (fresh processes: libtpu reads the accelerator type when it loads)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from opsd_jax.parallel import make_mesh
from tests.plan.test_plan import _plan, _run_config, _tiny_model, needs_libtpu


class _Device:
    def __init__(self, id, slice_index):
        self.id, self.slice_index, self.process_index = id, slice_index, slice_index
        self.platform, self.device_kind = "cpu", "stand-in"

    def __repr__(self):
        return f"D{self.id}"


def test_make_mesh_puts_the_slices_on_the_data_axis(monkeypatch):
    """Devices of two slices (CPU stand-ins carrying slice_index): train.mesh is per slice, the
    slice is the outermost part of the data axis, and a per-slice mesh that does not fit is named."""
    import jax.sharding

    captured = {}
    monkeypatch.setattr(jax.sharding.Mesh, "__init__", lambda self, grid, axes: captured.update(grid=grid, axes=axes))
    devices = [_Device(i, i // 4) for i in range(8)]
    make_mesh(1, -1, 1, devices=devices)
    grid = captured["grid"]
    assert grid.shape == (2, 4, 1) and captured["axes"] == ("data", "fsdp", "tensor")
    assert [[d.slice_index for d in row.flat] for row in grid] == [[0] * 4, [1] * 4]
    make_mesh(2, -1, 2, devices=devices[::-1])
    assert captured["grid"].shape == (4, 1, 2)
    assert np.array([[d.slice_index for d in row.flat] for row in captured["grid"]]).tolist() == [[0, 0], [0, 0],
                                                                                                  [1, 1], [1, 1]]
    with pytest.raises(ValueError, match="needs 8 devices, but 4 devices per slice are available"):
        make_mesh(1, 8, 1, devices=devices)


SLICE_MESH = """
import os, sys
os.environ.update({"TPU_ACCELERATOR_TYPE": "v5p-8", "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1",
                   "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
from opsd_jax.parallel import make_mesh
from opsd_jax.plan.topology import parse_topology, topology_devices
mesh = make_mesh(1, -1, 1, devices=topology_devices(parse_topology("v5p-8"), 2))
print(dict(mesh.shape), [sorted({d.slice_index for d in row.flat}) for row in mesh.devices])
"""


@needs_libtpu
def test_two_v5p_slices_plan_the_train_step_on_the_dcn_mesh(tmp_path):
    done = subprocess.run([sys.executable, "-c", SLICE_MESH], capture_output=True, text=True, timeout=300, check=False,
                          env={k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "{'data': 2, 'fsdp': 4, 'tensor': 1} [[0], [1]]"
    model = _tiny_model(tmp_path / "tiny")
    done = _plan(tmp_path, _run_config(model), "--topology", "v5p-8", "--num-slices", "2", "--programs", "train",
                 "--kernel-impl", "xla")
    report = json.loads((tmp_path / "plan.json").read_text())
    assert (report["slices"], report["chips"], report["hosts"]) == (2, 8, 2), done.stdout + done.stderr[-3000:]
    train = {r["name"]: r for r in report["programs"]}["train_step"]
    assert train["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and train["verdict"] == "fits", train
    assert "x 2 slices over DCN" in done.stdout and "preemption: checkpoint" in done.stdout
    assert report["checkpoint"]["grace_seconds"] > 0
