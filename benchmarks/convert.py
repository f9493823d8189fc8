"""Conversion benchmark: a random ~1.1B-parameter Qwen3-architecture bf16 checkpoint on disk,
converted HF -> Orbax and Orbax -> HF, each in a fresh process.

Prints peak host memory (max RSS of the converting process) divided by the checkpoint size
(goal <= 1.3), the same ratio above the RSS of a process that only imports the libraries, and
seconds; the peer measured in the same run is transformers' `from_pretrained` of the same files.
    python benchmarks/convert.py [--workdir DIR] [--layers 16] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

ARCHITECTURE = dict(  # Qwen3-1.7B widths with 16 layers: 1.12B parameters
    model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=2048,
    intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1_000_000.0,
    hidden_act="silu", attention_bias=False, dtype="bfloat16",
)


def write_checkpoint(path: str, layers: int, shard_bytes: int = 2**30) -> int:
    """Random bf16 tensors in HF names and shapes, sharded with an index; returns total bytes."""
    from safetensors.numpy import save_file

    from opsd_jax.checkpoint.hf import tensor_mappings
    from opsd_jax.models import ModelConfig

    hf = dict(ARCHITECTURE, num_hidden_layers=layers)
    config = ModelConfig.from_hf(hf)
    os.makedirs(path)
    rng = np.random.default_rng(0)
    shards, shard, size, total = [], {}, 0, 0
    for mapping in tensor_mappings(config):
        value = (rng.standard_normal(mapping.hf_shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        if shard and size + value.nbytes > shard_bytes:
            shards.append(shard)
            shard, size = {}, 0
        shard[mapping.hf_name], size, total = value, size + value.nbytes, total + value.nbytes
    shards.append(shard)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    return total


def measure(command: list[str], env=None) -> tuple[float, float]:
    """(seconds, peak RSS bytes) of one fresh child process, from its own rusage (os.wait4)."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            out.seek(0)
            raise RuntimeError(f"{command} failed:\n{out.read().decode()[-4000:]}")
    return seconds, usage.ru_maxrss * 1024.0


def exported_equals_original(original_dir: str, exported_dir: str) -> bool:
    """Every tensor of the export has the original's bytes (read one tensor at a time)."""
    from safetensors import safe_open

    def tensors(folder):
        index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]
        return {name: os.path.join(folder, file) for name, file in index.items()}

    original, exported = tensors(original_dir), tensors(exported_dir)
    if original.keys() != exported.keys():
        return False
    for name in original:
        with safe_open(original[name], "numpy") as a, safe_open(exported[name], "numpy") as b:
            if a.get_tensor(name).tobytes() != b.get_tensor(name).tobytes():
                return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--write-checkpoint-only", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_checkpoint_only:
        print(write_checkpoint(args.write_checkpoint_only, args.layers))
        return 0
    root = args.workdir or tempfile.mkdtemp(prefix="opsd-convert-bench-")
    hf_dir, orbax_dir, back_dir = (os.path.join(root, n) for n in ("hf", "orbax", "hf-back"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "TQDM_DISABLE": "1"}
    try:
        # Written by a child process: a parent that had held the tensors would pass its resident
        # pages to every child it forks, inflating their peak RSS.
        writer = subprocess.run(
            [sys.executable, __file__, "--layers", str(args.layers), "--write-checkpoint-only", hf_dir],
            check=True, capture_output=True, text=True, env=env,
        )
        total = int(writer.stdout.split()[-1])
        params = total // 2
        print(f"checkpoint: {params / 1e9:.2f}B parameters, {total / 2**30:.2f} GiB bf16, {hf_dir}")
        python = sys.executable
        rows = []
        imports = "import jax, orbax.checkpoint, safetensors, transformers, opsd_jax.cli"
        rows.append(("import only (baseline)", *measure([python, "-c", imports], env)))
        rows.append(("opsd-jax HF -> Orbax (bf16)", *measure(
            [python, "-m", "opsd_jax.cli", "convert", "--from-hf", hf_dir, "--to-orbax", orbax_dir,
             "--dtype", "bfloat16"], env)))
        rows.append(("opsd-jax Orbax -> HF (bf16)", *measure(
            [python, "-m", "opsd_jax.cli", "convert", "--from-orbax", orbax_dir, "--to-hf", back_dir,
             "--max-shard-gb", "1"], env)))
        peer = (
            "import torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained("
            f"{hf_dir!r}, dtype=torch.bfloat16); print(sum(p.numel() for p in m.parameters()))"
        )
        rows.append(("peer: transformers from_pretrained (bf16)", *measure([python, "-c", peer], env)))
        identical = exported_equals_original(hf_dir, back_dir)
        baseline = rows[0][2]
        print(f"{'process':42} {'seconds':>8} {'peak RSS GiB':>13} {'peak/ckpt':>10} {'(peak-import)/ckpt':>19}")
        for name, seconds, peak in rows:
            print(f"{name:42} {seconds:8.1f} {peak / 2**30:13.2f} {peak / total:10.2f} "
                  f"{(peak - baseline) / total:19.2f}")
        print(f"HF -> Orbax -> HF bit-exact: {identical}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
