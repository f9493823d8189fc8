"""The plan's numbers are honest: for one small model on the CPU backend, the per-device bytes the
plan reports for the train step are what a real run of the same step allocates."""

import json
import os
import subprocess
import sys

import pytest

from tests.plan.test_plan import _tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")
def test_plan_bytes_match_a_real_cpu_run(tmp_path):
    """One train step (8 sequences of 512 tokens in 2 microbatches, frozen teacher, remat) of a
    2-layer Qwen3 (hidden 256, MLP 1024, vocabulary 4096) on the 8 CPU devices, mesh auto.

    Arguments, outputs and aliases: the arrays the run holds on a device are the plan's bytes
    exactly (outputs: plus the 8-byte-per-output tuple table memory_analysis counts). Temporaries
    are invisible to jax on CPU (no memory_stats), so they are measured as the process's peak
    resident-set growth over the step: every device's temporaries and unaliased outputs, plus the
    runtime's own (thread stacks, metrics, allocator headers: 5-11% in the measurements recorded in
    the notes). malloc is told to map every block over 64 KiB afresh, so freed compile-time memory
    is not reused unseen. The bounds: the plan may not overstate by more than 10% or understate by
    more than 25%."""
    model = _tiny_model(tmp_path / "model", vocab_size=4096, hidden_size=256, intermediate_size=1024,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    # No persistent compilation cache (conftest sets one): an executable read back from it is not
    # the memory a real first run holds.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-m", "tests.plan.measure_train_step", model, "auto"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    plan = m["plan"]
    assert m["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and m["devices"] == 8
    # The plan compiles the program the real arrays compile to.
    assert m["compiled_for_real_arrays"] == plan
    assert m["arguments_on_device"] == plan["argument_bytes"]
    assert m["donated_deleted"] and m["state_on_device"] == plan["alias_bytes"]
    assert plan["output_bytes"] - m["outputs_on_device"] == 8 * m["output_leaves"]
    expected = m["devices"] * (plan["output_bytes"] - plan["alias_bytes"] + plan["temp_bytes"])
    assert plan["temp_bytes"] > 20 * 2**20  # the temporaries dominate what is measured
    assert 0.9 * expected <= m["peak_growth_bytes"] <= 1.25 * expected, (m["peak_growth_bytes"], expected)
