"""pallas_tpu compiles through Mosaic for real TPU topologies on this CPU host (needs libtpu)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# (topology, the accelerator type libtpu must be told about before it loads)
TOPOLOGIES = [("v5e:2x2", "v5litepod-4"), ("v6e:2x2", "v6e-4"), ("v5p:2x2x1", "v5p-8")]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu absent: install the [tpu] extra")
@pytest.mark.parametrize("topology,accelerator", TOPOLOGIES)
def test_fused_kernel_compiles_for_tpu(topology, accelerator):
    root = Path(__file__).resolve().parents[2]
    # A fresh process: conftest pins this one to CPU, and libtpu reads the accelerator type at load.
    # Compiling needs no chip: skip libtpu's one-process-per-host lock so other compiles may run beside it.
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE=accelerator, PYTHONPATH=str(root),
               ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.tpu_aot_compile", topology],
        cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    print("\n".join(lines))  # memory_analysis() for the log
    report = json.loads(lines[-1])
    assert report["device_kind"].startswith("TPU")
    # statistics, JSD second pass, d/dh and d/dW: all four must be Mosaic kernels, not interpreter HLO.
    assert report["mosaic_custom_calls"] == 4
    assert 0 < report["temp_bytes"] < 2 * 2**30
