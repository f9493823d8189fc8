"""Orbax parameter checkpoints: restore onto another mesh, dtype casts, CLI round trips."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from opsd_jax import forward, load_hf
from opsd_jax.checkpoint.hf import CheckpointError
from opsd_jax.checkpoint.orbax import restore_params, save_params
from opsd_jax.cli import main as cli_main
from opsd_jax.parallel import make_mesh
from opsd_jax.testing import save_tiny_hf_model


def _seed(rng):
    return int(rng.integers(2**31))


def test_save_on_one_mesh_restore_on_another(tmp_path, rng):
    save_tiny_hf_model("olmo3", str(tmp_path / "hf"), seed=_seed(rng))
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    config, params = load_hf(tmp_path / "hf", mesh=make_mesh(2, 2, 2), progress=False)
    save_params(params, config, tmp_path / "orbax")
    assert (tmp_path / "orbax" / "hf" / "tokenizer_config.json").exists()
    for shape in [(1, 8, 1), (8, 1, 1), (1, 2, 4)]:
        mesh = make_mesh(*shape)
        restored_config, restored = restore_params(tmp_path / "orbax", mesh=mesh)
        assert restored_config == config
        for original, back in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
            assert back.sharding.mesh.shape == mesh.shape
            np.testing.assert_array_equal(np.asarray(back), np.asarray(original))
    tokens = rng.integers(0, config.vocab_size, (2, 9))
    # Equal parameters; only the reduction order of the sharded matmuls differs between meshes.
    np.testing.assert_allclose(
        np.asarray(forward(restored, restored_config, tokens)), np.asarray(forward(params, config, tokens)),
        atol=2e-5,
    )


def test_restore_casts_dtype(tmp_path, rng):
    save_tiny_hf_model("qwen3-tied", str(tmp_path / "hf"), seed=_seed(rng))
    config, params = load_hf(tmp_path / "hf", progress=False)
    save_params(params, config, tmp_path / "orbax")
    restored_config, restored = restore_params(tmp_path / "orbax", dtype="bfloat16")
    assert restored_config.param_dtype == "bfloat16"
    for original, back in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        assert back.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(back), np.asarray(original).astype(back.dtype))


def test_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="opsd_jax.json not found"):
        restore_params(tmp_path)


def test_cli_round_trip_is_bit_exact(tmp_path, rng, capsys):
    save_tiny_hf_model("qwen3", str(tmp_path / "hf"), seed=_seed(rng), dtype="bfloat16")
    assert cli_main(["convert", "--from-hf", str(tmp_path / "hf"), "--to-orbax", str(tmp_path / "orbax"),
                     "--mesh", "2,2,2"]) == 0
    manifest = json.loads((tmp_path / "orbax" / "opsd_jax.json").read_text())
    assert manifest["param_dtype"] == "float32"
    assert cli_main(["convert", "--from-orbax", str(tmp_path / "orbax"), "--to-hf", str(tmp_path / "back"),
                     "--mesh", "1,-1,1"]) == 0
    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    for key in original:
        assert back[key].tobytes() == original[key].tobytes(), key
    # A second conversion onto an existing destination is refused and changes nothing.
    before = sorted(os.listdir(tmp_path / "back"))
    assert cli_main(["convert", "--from-orbax", str(tmp_path / "orbax"), "--to-hf", str(tmp_path / "back")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "back")) == before


def test_cli_rejects_a_mesh_that_does_not_fit(tmp_path, rng, capsys):
    save_tiny_hf_model("qwen3", str(tmp_path / "hf"), seed=_seed(rng))
    status = cli_main(["convert", "--from-hf", str(tmp_path / "hf"), "--to-orbax", str(tmp_path / "o"),
                       "--mesh", "3,1,1"])
    assert status == 2 and "needs 3 devices, but 8 devices are available" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_library_accepts_relative_and_home_paths(tmp_path, rng, monkeypatch):
    """Orbax refuses relative paths; the library resolves them against the current directory."""
    from opsd_jax.checkpoint.hf import save_hf

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    save_tiny_hf_model("qwen3", "hf", seed=_seed(rng))
    config, params = load_hf("hf", progress=False)
    save_params(params, config, "checkpoints/relative")
    save_params(params, config, "~/checkpoints/home")
    assert (tmp_path / "home" / "checkpoints" / "home" / "opsd_jax.json").exists()
    for path in ("checkpoints/relative", "~/checkpoints/home"):
        _, restored = restore_params(path)
        for original, back in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
            np.testing.assert_array_equal(np.asarray(back), np.asarray(original))
    save_hf(restored, config, "~/exported", progress=False)
    assert load_file(str(tmp_path / "home" / "exported" / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "hf" / "model.safetensors")).keys()


def test_checkpoint_of_the_unstacked_layout_names_the_rewrite(tmp_path, rng):
    save_tiny_hf_model("qwen3-tied", str(tmp_path / "hf"), seed=_seed(rng))
    config, params = load_hf(tmp_path / "hf", progress=False)
    save_params(params, config, tmp_path / "orbax")
    manifest_path = tmp_path / "orbax" / "opsd_jax.json"
    manifest = json.loads(manifest_path.read_text())
    assert "layers.layers_0.mlp.up_proj.kernel" in manifest["groups"]  # one group per stacked leaf
    manifest_path.write_text(json.dumps({**manifest, "layout_version": 2}))
    with pytest.raises(CheckpointError, match="layout_version 2.*opsd-jax convert --from-hf"):
        restore_params(tmp_path / "orbax")
