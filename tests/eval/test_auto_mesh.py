"""`opsd-jax eval --mesh auto`: the sampler's mesh for the checkpoint's model, from config.json alone."""

import jax
import pytest

from opsd_jax.eval.cli import auto_serving_mesh
from opsd_jax.testing import save_tiny_hf_model


def test_auto_eval_mesh_splits_the_kv_heads_and_the_slots(tmp_path):
    save_tiny_hf_model("qwen3", str(tmp_path / "model"), seed=0)  # 2 KV heads
    mesh = auto_serving_mesh(str(tmp_path / "model"))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2} and mesh.devices.size == len(jax.devices())
    assert dict(auto_serving_mesh(str(tmp_path / "model"), jax.devices()[:3]).shape) == {
        "data": 3, "fsdp": 1, "tensor": 1}


def test_auto_eval_mesh_without_a_config_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--mesh auto reads the config.json of --checkpoint: .*nowhere"):
        auto_serving_mesh(str(tmp_path / "nowhere"))
