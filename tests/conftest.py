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


# Tiny checkpoints are built once per module, before any test's own generator exists; they draw
# their weights from this one per-session seed so that a failure can be replayed whole.
MODEL_SEED = int(os.environ.get("OPSD_MODEL_SEED") or int.from_bytes(os.urandom(4), "little")) % 2**31


def pytest_report_header(config):
    return f"tiny model weights: OPSD_MODEL_SEED={MODEL_SEED}"


@pytest.fixture(scope="session")
def model_seed():
    """The seed every module-scoped tiny checkpoint is built from (OPSD_MODEL_SEED=N replays one)."""
    return MODEL_SEED


@pytest.fixture
def rng():
    """A fresh NumPy generator per test: inputs differ on every run, the seed is printed on failure
    (OPSD_TEST_SEED=N replays one; OPSD_MODEL_SEED=N the tiny checkpoints' weights)."""
    seed = int(os.environ.get("OPSD_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"numpy seed: {seed} (OPSD_TEST_SEED={seed} OPSD_MODEL_SEED={MODEL_SEED})")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def cpu_devices():
    devices = jax.devices("cpu")
    assert len(devices) == 8, "conftest must run before jax initializes its backends"
    return devices
