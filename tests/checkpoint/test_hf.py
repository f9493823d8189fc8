"""HF safetensors import/export: bit-exact round trips, sharded files, clear errors, no
half-written destinations."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from opsd_jax import forward, load_hf, save_hf
from opsd_jax.checkpoint import hf as hf_module
from opsd_jax.checkpoint.hf import CheckpointError
from opsd_jax.cli import main as cli_main
from opsd_jax.parallel import make_mesh
from opsd_jax.testing import hf_logits, save_tiny_hf_model


def _seed(rng):
    return int(rng.integers(2**31))


def _all_tensors(path):
    tensors = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), framework="numpy") as handle:
                for name in handle.keys():
                    tensors[name] = handle.get_tensor(name)
    return tensors


@pytest.mark.parametrize("name, dtype", [("qwen3", "bfloat16"), ("olmo3", "float32"), ("qwen3-tied", "float32")])
def test_hf_jax_hf_is_bit_exact_and_loads_in_transformers(name, dtype, tmp_path, rng):
    source = tmp_path / "source"
    # Sharded source (several files and an index) exercises the index reader.
    save_tiny_hf_model(name, str(source), seed=_seed(rng), dtype=dtype, max_shard_size="40KB")
    (source / "generation_config.json").exists() or (source / "generation_config.json").write_text("{}")
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    assert (source / "model.safetensors.index.json").exists()
    config, params = load_hf(source, dtype="float32", mesh=make_mesh(2, 2, 2), progress=False)
    assert config.hf_dtype == dtype
    export = tmp_path / "export"
    save_hf(params, config, export, max_shard_bytes=60_000, progress=False)

    original, exported = _all_tensors(source), _all_tensors(export)
    assert sorted(original) == sorted(exported)
    for key in original:
        assert exported[key].dtype == original[key].dtype, key
        assert exported[key].tobytes() == original[key].tobytes(), key
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert len(set(index["weight_map"].values())) > 1
    assert (export / "tokenizer_config.json").exists() and (export / "generation_config.json").exists()
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in exported

    # Both sides loaded by transformers the same way: the in-memory model was cast with .to(), which
    # also casts its RoPE buffers, while from_pretrained keeps them in float32.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    original_model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    tokens = rng.integers(0, config.vocab_size, (2, 10))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(original_model, tokens))


def test_export_in_another_dtype_and_single_file(tmp_path, rng):
    save_tiny_hf_model("olmo2", str(tmp_path / "source"), seed=_seed(rng))
    config, params = load_hf(tmp_path / "source", progress=False)
    save_hf(params, config, tmp_path / "export", dtype="bfloat16", progress=False)
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["dtype"] == "bfloat16"
    original = load_file(tmp_path / "source" / "model.safetensors")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    for key, value in original.items():
        assert exported[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(exported[key], value.astype(ml_dtypes.bfloat16))


@pytest.fixture
def tiny_checkpoint(tmp_path, rng):
    path = tmp_path / "hf"
    save_tiny_hf_model("qwen3", str(path), seed=_seed(rng))
    return path


def _convert_to_orbax(source, destination, capsys):
    status = cli_main(["convert", "--from-hf", str(source), "--to-orbax", str(destination)])
    return status, capsys.readouterr().err


def test_missing_config_json(tiny_checkpoint, tmp_path, capsys):
    os.remove(tiny_checkpoint / "config.json")
    status, err = _convert_to_orbax(tiny_checkpoint, tmp_path / "out", capsys)
    assert status == 2 and f"{tiny_checkpoint}/config.json not found" in err
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type(tiny_checkpoint, tmp_path, capsys):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (tiny_checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    status, err = _convert_to_orbax(tiny_checkpoint, tmp_path / "out", capsys)
    assert status == 2 and "unsupported model_type 'gpt2'" in err and "qwen3, olmo2, olmo3" in err
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_names_the_file(tiny_checkpoint, tmp_path, capsys):
    weights = tiny_checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    status, err = _convert_to_orbax(tiny_checkpoint, tmp_path / "out", capsys)
    assert status == 2 and str(weights) in err and "truncated" in err
    assert not (tmp_path / "out").exists()


def _rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path, capsys):
    _rewrite(tiny_checkpoint / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    status, err = _convert_to_orbax(tiny_checkpoint, tmp_path / "out", capsys)
    assert status == 2 and "missing tensor(s) model.layers.1.mlp.up_proj.weight" in err
    assert not (tmp_path / "out").exists()


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path, capsys):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]

    _rewrite(tiny_checkpoint / "model.safetensors", shrink)
    status, err = _convert_to_orbax(tiny_checkpoint, tmp_path / "out", capsys)
    assert status == 2 and "'model.layers.0.self_attn.k_proj.weight' has shape [47, 64]" in err
    assert "[48, 64]" in err
    assert not (tmp_path / "out").exists()


def test_unexpected_tensor_is_named(tiny_checkpoint):
    _rewrite(tiny_checkpoint / "model.safetensors", lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="tensor\\(s\\) extra are not part of a qwen3 model"):
        load_hf(tiny_checkpoint, progress=False)


def test_index_pointing_to_missing_file(tiny_checkpoint):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00009-of-00009.safetensors"}}
    (tiny_checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="points to missing file model-00009-of-00009"):
        load_hf(tiny_checkpoint, progress=False)


def test_interrupted_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    config, params = load_hf(tiny_checkpoint, progress=False)
    written = []
    real_writer = hf_module._write_safetensors

    def failing_writer(file, mappings, dtype, values):
        if written:
            raise OSError("disk full")
        written.append(file)
        real_writer(file, mappings, dtype, values)

    monkeypatch.setattr(hf_module, "_write_safetensors", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        save_hf(params, config, tmp_path / "export", max_shard_bytes=50_000, progress=False)
    assert written  # the first shard was written before the failure
    assert not (tmp_path / "export").exists()
    assert os.listdir(tmp_path) == ["hf"]  # no staging directory left behind


def test_existing_destination_is_kept_without_overwrite(tiny_checkpoint, tmp_path):
    config, params = load_hf(tiny_checkpoint, progress=False)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        save_hf(params, config, tmp_path / "export", progress=False)
    assert (tmp_path / "export" / "keep.txt").read_text() == "mine"
    save_hf(params, config, tmp_path / "export", overwrite=True, progress=False)
    assert not (tmp_path / "export" / "keep.txt").exists()
    assert (tmp_path / "export" / "model.safetensors").exists()


def test_save_rejects_params_of_another_model(tiny_checkpoint, tmp_path):
    config, params = load_hf(tiny_checkpoint, progress=False)
    params["layers"]["layers_0"]["mlp"]["up_proj"]["kernel"] = jax.numpy.zeros((3, 3))
    with pytest.raises(CheckpointError, match=r"\['layers'\]\['layers_0'\]\['mlp'\]\['up_proj'\]\['kernel'\] has shape"):
        save_hf(params, config, tmp_path / "export", progress=False)
    assert not (tmp_path / "export").exists()


def test_loaded_params_are_placed_by_the_logical_rules(tiny_checkpoint):
    mesh = make_mesh(2, 2, 2)
    config, params = load_hf(tiny_checkpoint, mesh=mesh, progress=False)
    spec = params["layers"]["layers_0"]["attention"]["q_proj"]["kernel"].sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor", None)  # layers whole, embed -> fsdp, heads -> tensor
    assert tuple(params["embedding"].sharding.spec) == ("tensor", "fsdp")  # vocab 1000 = 2 x 500
    logits = forward(params, config, np.zeros((2, 3), np.int32))
    assert logits.shape == (2, 3, config.vocab_size)
