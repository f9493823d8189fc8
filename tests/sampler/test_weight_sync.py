"""Training weights reach each process's sampler device to device, equal to a host gather."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_process_weight_sync_equals_the_host_gather():
    """2 processes x 4 CPU devices: fsdp-sharded float32 training weights to each process's
    tensor-parallel bf16 sampler (2 KV heads -> tensor 2, data 2), bit for bit."""
    result = subprocess.run(
        [os.path.join(REPO, "launch", "local_cpu_cluster.sh"), "-n", "2", "-d", "4", "--", sys.executable,
         os.path.join(REPO, "benchmarks", "weight_sync.py"), "--layers", "2", "--hidden", "512", "--vocab", "1024",
         "--check-only"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for process in (0, 1):
        assert (f"process {process}: weight sync equal to the host gather on "
                "{'data': 2, 'fsdp': 1, 'tensor': 2}") in result.stdout
