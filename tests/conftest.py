"""Every test runs on an 8-device CPU mesh; the flag must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same programs (the tiny models' forward, the sampler's steps, the
# training step) from fresh jit closures, and the CLI and multi-process tests compile them again
# in subprocesses. XLA's persistent cache turns every repeat into a read: a fresh folder per run
# (so no run reads another's entries), inherited by subprocesses through the environment. A
# caller's own JAX_COMPILATION_CACHE_DIR is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="opsd-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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


# ----------------------------------------------------------------------------- the slow tier
SLOW_TESTS = os.path.join(os.path.dirname(__file__), "slow_tests.txt")


def _slow_test_ids():
    """Node ids listed in slow_tests.txt (comments and '# N s' annotations dropped)."""
    with open(SLOW_TESTS) as f:
        return {line.split("#", 1)[0].strip() for line in f} - {""}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    slow_ids = _slow_test_ids()
    collected = {item.nodeid for item in items}
    for item in items:
        if item.nodeid in slow_ids:
            item.add_marker(pytest.mark.slow)
    # A renamed or removed test would otherwise drop out of the slow tier silently. Checked only
    # when whole files were collected (no node ids or -k on the command line).
    if config.option.keyword or any("::" in arg for arg in config.args):
        return
    files = {nodeid.split("::", 1)[0] for nodeid in collected}
    stale = sorted(i for i in slow_ids if i.split("::", 1)[0] in files and i not in collected)
    if stale:
        raise pytest.UsageError(f"{SLOW_TESTS} lists tests that no longer exist: {', '.join(stale)}")
