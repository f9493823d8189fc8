"""Every test runs on an 8-device CPU mesh; the flag must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
    """A fresh NumPy generator per test: inputs differ on every run, the seed is printed on failure
    (OPSD_TEST_SEED=N replays one)."""
    seed = int(os.environ.get("OPSD_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"numpy seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def cpu_devices():
    devices = jax.devices("cpu")
    assert len(devices) == 8, "conftest must run before jax initializes its backends"
    return devices
