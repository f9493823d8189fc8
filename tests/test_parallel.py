"""Mesh construction, the logical-axis rules, and a real two-process cluster on loopback."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from opsd_jax.testing import tiny_hf_config

from opsd_jax.parallel import (
    LOGICAL_AXIS_RULES,
    SERVING_AXIS_RULES,
    initialize_distributed,
    logical_to_spec,
    make_mesh,
    parse_mesh_shape,
    tree_shardings,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "sizes, expected",
    [((2, 2, 2), (2, 2, 2)), ((1, -1, 1), (1, 8, 1)), ((2, -1, 2), (2, 2, 2)), ((-1, 1, 4), (2, 1, 4))],
)
def test_make_mesh_infers_one_axis(sizes, expected):
    mesh = make_mesh(*sizes)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == expected
    assert len(set(mesh.devices.flat)) == 8


@pytest.mark.parametrize(
    "sizes, message",
    [((3, -1, 1), "not divisible by 3"), ((-1, -1, 1), "only one mesh axis"), ((2, 2, 1), "needs 4 devices"),
     ((0, 1, 1), "positive integer or -1")],
)
def test_make_mesh_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(*sizes)


def test_parse_mesh_shape():
    assert parse_mesh_shape("2, -1,1") == (2, -1, 1)
    # the config's own parser (config.mesh_sizes), so a command line and a config refuse alike
    for bad in ("2,2", "a,b,c", "0,1,8", "1,-1,-1"):
        with pytest.raises(ValueError, match=r"--mesh: .* is neither 'auto' nor three sizes data,fsdp,tensor"):
            parse_mesh_shape(bad)


def test_rules_cover_every_logical_name():
    for name in ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab"):
        assert name in LOGICAL_AXIS_RULES


def test_logical_to_spec_drops_axes_that_do_not_divide_and_never_repeats_one():
    mesh = make_mesh(2, 2, 2)
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == PartitionSpec("fsdp", "tensor", None)
    # 3 heads cannot split over tensor=2: replicated there instead of failing to place.
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 3, 16), mesh) == PartitionSpec("fsdp", None, None)
    # batch takes data and fsdp; embed would also want fsdp, which is taken.
    assert logical_to_spec(("batch", "seq", "embed"), (8, 5, 64), mesh) == PartitionSpec(("data", "fsdp"), None, None)
    assert logical_to_spec(("batch",), (2,), mesh) == PartitionSpec("data")
    # Size-1 mesh axes are left out of specs.
    assert logical_to_spec(("embed", "vocab"), (64, 100), make_mesh(1, 8, 1)) == PartitionSpec("fsdp", None)
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("nonsense",))


def test_an_untied_head_splits_its_vocabulary_over_tensor_then_fsdp():
    """The untied head [D, V] is stored as the divergence kernel reads it: its vocabulary over
    tensor, then fsdp, D whole; D takes fsdp where fsdp does not divide the vocabulary (OLMo-3's
    100,278 columns); the sampler's rules keep the vocabulary over tensor alone. A tied head is
    the embedding's transpose, D over fsdp."""
    from opsd_jax.models import ModelConfig, param_shardings

    axes = ("head_embed", "head_vocab")
    assert logical_to_spec(axes, (64, 151_936), make_mesh(1, 8, 1)) == PartitionSpec(None, "fsdp")
    assert logical_to_spec(axes, (64, 151_936), make_mesh(2, 2, 2)) == PartitionSpec(None, ("tensor", "fsdp"))
    assert logical_to_spec(axes, (64, 100_278), make_mesh(1, 4, 2)) == PartitionSpec("fsdp", "tensor")
    assert logical_to_spec(axes, (64, 151_936), make_mesh(2, 2, 2), SERVING_AXIS_RULES) == PartitionSpec(None, "tensor")
    mesh = make_mesh(1, 4, 2)
    for tied in (False, True):
        config = ModelConfig.from_hf(tiny_hf_config("qwen3", vocab_size=1024, tie_word_embeddings=tied).to_dict())
        shardings = param_shardings(config, mesh)
        assert ("lm_head" in shardings) is not tied
        if not tied:
            assert shardings["lm_head"].spec == PartitionSpec(None, ("tensor", "fsdp"))
        assert shardings["embedding"].spec == PartitionSpec("tensor", "fsdp")


def test_tree_shardings_places_every_leaf(rng):
    mesh = make_mesh(2, 2, 2)
    shapes = {"a": jax.ShapeDtypeStruct((64, 4, 16), np.float32), "b": {"c": jax.ShapeDtypeStruct((7,), np.float32)}}
    logical = {"a": ("embed", "heads", "head_dim"), "b": {"c": ("vocab",)}}
    shardings = tree_shardings(mesh, logical, shapes)
    assert shardings["a"].spec == PartitionSpec("fsdp", "tensor", None)
    assert shardings["b"]["c"].spec == PartitionSpec(None)
    value = rng.normal(size=(64, 4, 16)).astype(np.float32)
    placed = jax.device_put(value, shardings["a"])
    np.testing.assert_array_equal(np.asarray(placed), value)


def test_initialize_distributed_is_a_no_op_without_a_cluster(monkeypatch):
    for name in ("OPSD_COORDINATOR", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False


def test_initialize_distributed_names_missing_variables(monkeypatch):
    monkeypatch.setenv("OPSD_COORDINATOR", "127.0.0.1:1")
    monkeypatch.delenv("OPSD_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="OPSD_NUM_PROCESSES must be set"):
        initialize_distributed()


TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from opsd_jax import forward, load_hf
    from opsd_jax.parallel import initialize_distributed, make_mesh
    from jax.sharding import NamedSharding, PartitionSpec
    assert initialize_distributed()
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    mesh = make_mesh(2, 2, 2)
    config, params = load_hf(sys.argv[1], mesh=mesh, progress=False)
    tokens = np.load(sys.argv[2])
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    tokens = jax.make_array_from_callback(tokens.shape, batch, lambda index: tokens[index])
    logits = jax.jit(forward, static_argnums=1)(params, config, tokens)
    gathered = multihost_utils.process_allgather(logits, tiled=True)
    if jax.process_index() == 0:
        np.save(sys.argv[3], np.asarray(gathered))
    """
)


def test_two_process_cluster_matches_one_process(tmp_path, rng):
    from opsd_jax import forward, load_hf
    from opsd_jax.testing import save_tiny_hf_model

    save_tiny_hf_model("olmo3", str(tmp_path / "hf"), seed=int(rng.integers(2**31)))
    tokens = rng.integers(0, 1000, (4, 12)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    (tmp_path / "job.py").write_text(TWO_PROCESS_SCRIPT)
    result = subprocess.run(
        [os.path.join(REPO, "launch", "local_cpu_cluster.sh"), "-n", "2", "-d", "4", "--", sys.executable,
         str(tmp_path / "job.py"), str(tmp_path / "hf"), str(tmp_path / "tokens.npy"), str(tmp_path / "out.npy")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config, params = load_hf(tmp_path / "hf", progress=False)
    expected = np.asarray(forward(params, config, tokens))
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=2e-5)
