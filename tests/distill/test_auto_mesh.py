"""`train.mesh: auto` in the trainer: the mesh it builds from the student's config.json, the state
bytes the rule weighs, one step on that mesh, and a clear error without a config.json."""

import glob
import os

import numpy as np
import pytest

from opsd_jax.config import load_config
from opsd_jax.distill.trainer import Trainer, TrainingError, train_mesh, training_state_bytes
from opsd_jax.models import ModelConfig

from tests.distill.test_trainer import _overrides


def _checkpoint_parameter_bytes(model_dir) -> int:
    """Bytes of every tensor transformers wrote (float32): an independent count of the parameters."""
    from safetensors.numpy import load_file

    return sum(array.nbytes for path in glob.glob(os.path.join(model_dir, "*.safetensors"))
               for array in load_file(path).values())


def test_training_state_bytes_counts_params_gradients_moments_and_teacher(model_dir):
    student = ModelConfig.from_hf(model_dir, param_dtype="float32")
    params = _checkpoint_parameter_bytes(model_dir)
    frozen = load_config(None, ["teacher.kind=frozen", "model.compute_dtype=float32"])
    frozen_bf16 = load_config(None, ["teacher.kind=frozen", "model.compute_dtype=bfloat16"])
    ema_bf16 = load_config(None, ["teacher.kind=ema", "model.compute_dtype=bfloat16"])
    live = load_config(None, ["teacher.kind=live"])
    assert training_state_bytes(frozen, student) == 5 * params  # params, gradients, 2 moments, teacher copy
    assert training_state_bytes(frozen_bf16, student) == 4 * params + params // 2  # the copy in compute dtype
    assert training_state_bytes(ema_bf16, student) == 5 * params
    assert training_state_bytes(live, student) == 4 * params


def test_auto_mesh_from_the_students_config(model_dir, tmp_path):
    """The tiny Qwen3 has 4 heads and 2 KV heads; 4 sequences per microbatch on 8 CPU devices leave
    each sequence on 2 chips under fsdp alone, so auto takes tensor 2 (CPU reports no memory:
    fsdp takes the rest)."""
    config = load_config(None, _overrides(model_dir, tmp_path / "run", **{"train.mesh": "auto"}))
    trainer = Trainer(config)
    assert dict(trainer.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    more = load_config(None, _overrides(model_dir, tmp_path / "run", **{"train.mesh": "auto",
                                                                        "train.batch_size": 16}))
    assert dict(train_mesh(more, trainer.mesh.devices.flat).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    # A memory that a quarter of holds the whole state: fsdp 1, the chips become data replicas.
    state = training_state_bytes(more, ModelConfig.from_hf(model_dir))
    assert dict(train_mesh(more, list(trainer.mesh.devices.flat), memory_bytes=4 * state).shape) == {
        "data": 8, "fsdp": 1, "tensor": 1}


def test_one_step_on_the_auto_mesh(model_dir, tmp_path):
    config = load_config(None, _overrides(model_dir, tmp_path / "run", **{"train.mesh": "auto", "train.steps": 1}))
    trainer = Trainer(config)
    history = trainer.run()
    assert [h["step"] for h in history] == [1] and np.isfinite(history[0]["loss"])
    assert dict(trainer.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_auto_without_a_config_json_names_the_field(tmp_path):
    missing = tmp_path / "nowhere"
    config = load_config(None, _overrides(str(missing), tmp_path / "run", **{"train.mesh": "auto"}))
    with pytest.raises(TrainingError, match=r"train\.mesh: auto reads the config.json of model.checkpoint: .*nowhere not found"):
        Trainer(config)
    unset = load_config(None, _overrides("", tmp_path / "run", **{"train.mesh": "auto"}))
    with pytest.raises(TrainingError, match=r"train\.mesh: auto needs the model's config.json, but model.checkpoint"):
        Trainer(unset)
