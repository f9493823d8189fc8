"""`mesh: auto`: the rule of parallel.auto_mesh_shape, its multi-slice form, and the run config's
validation of `train.mesh`."""

import jax
import pytest

from opsd_jax.config import ConfigKeyError, load_config
from opsd_jax.parallel import STATE_MEMORY_SHARE, auto_mesh, auto_mesh_shape, is_auto_mesh, parse_mesh_shape

GiB = 2**30


@pytest.mark.parametrize("batch, heads, kv_heads, expected", [
    # Enough sequences per microbatch for every chip: all fsdp, no tensor parallelism.
    (8, 32, 8, (1, 8, 1)), (64, 16, 8, (1, 8, 1)),
    # 4 sequences on 8 chips: fsdp would leave each sequence on 2 chips; tensor 2 takes them.
    (4, 32, 32, (1, 4, 2)),
    # 2 sequences: tensor 4 would be needed, but 2 KV heads allow 2; 2 chips still share a sequence.
    (2, 4, 2, (1, 4, 2)),
    # Heads that no tensor size divides: tensor stays 1, whatever the batch.
    (1, 3, 3, (1, 8, 1)), (None, 32, 8, (1, 8, 1)),
])
def test_tensor_only_where_the_batch_leaves_chips_and_the_heads_divide(batch, heads, kv_heads, expected):
    assert auto_mesh_shape(8, num_heads=heads, num_kv_heads=kv_heads, batch=batch) == expected


def test_fsdp_only_as_far_as_the_state_needs_it():
    share = STATE_MEMORY_SHARE * 16 * GiB  # 4 GiB of a 16 GiB chip for the state
    # 8 GiB of state: fsdp 2 leaves 4 GiB per chip; the other chips become data replicas.
    assert auto_mesh_shape(8, num_heads=8, num_kv_heads=8, batch=8, state_bytes=int(2 * share),
                           memory_bytes=16 * GiB) == (4, 2, 1)
    assert auto_mesh_shape(8, num_heads=8, num_kv_heads=8, batch=8, state_bytes=int(2 * share) + 1,
                           memory_bytes=16 * GiB) == (2, 4, 1)
    # A state no split brings under the share, or an unknown memory (CPU): every chip on fsdp.
    assert auto_mesh_shape(8, num_heads=8, num_kv_heads=8, batch=8, state_bytes=100 * GiB,
                           memory_bytes=16 * GiB) == (1, 8, 1)
    assert auto_mesh_shape(8, num_heads=8, num_kv_heads=8, batch=8, state_bytes=GiB) == (1, 8, 1)
    # The tensor axis shards the state too: 4 sequences on 8 chips -> tensor 2, then fsdp 1 suffices.
    assert auto_mesh_shape(8, num_heads=8, num_kv_heads=8, batch=4, state_bytes=int(2 * share),
                           memory_bytes=16 * GiB) == (4, 1, 2)


def test_slices_split_the_batch_first():
    # 2 slices of 4 chips and 4 sequences: 2 per slice, so tensor 2 within each slice.
    assert auto_mesh_shape(4, num_heads=8, num_kv_heads=8, batch=4, num_slices=2) == (1, 2, 2)
    assert auto_mesh_shape(4, num_heads=8, num_kv_heads=8, batch=16, num_slices=2) == (1, 4, 1)


class _Device:
    def __init__(self, id, slice_index):
        self.id, self.slice_index, self.process_index = id, slice_index, slice_index
        self.platform, self.device_kind = "cpu", "stand-in"


def test_auto_mesh_over_slices_repeats_the_data_axis(monkeypatch):
    import jax.sharding

    captured = {}
    monkeypatch.setattr(jax.sharding.Mesh, "__init__", lambda self, grid, axes: captured.update(grid=grid))
    auto_mesh([_Device(i, i // 4) for i in range(8)], num_heads=8, num_kv_heads=8, batch=4)
    assert captured["grid"].shape == (2, 2, 2)
    assert [sorted({d.slice_index for d in row.flat}) for row in captured["grid"]] == [[0], [1]]


def test_auto_mesh_on_the_cpu_devices():
    mesh = auto_mesh(jax.devices(), num_heads=4, num_kv_heads=2, batch=4)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_bad_facts_name_the_argument():
    with pytest.raises(ValueError, match="auto mesh: num_kv_heads must be a positive integer, got 0"):
        auto_mesh_shape(8, num_heads=8, num_kv_heads=0)
    with pytest.raises(ValueError, match="needs explicit sizes"):
        parse_mesh_shape("auto")


@pytest.mark.parametrize("value, stored", [("auto", "auto"), (" Auto ", "auto"), ("1,-1,1", "1,-1,1"),
                                           ("2, 2, 2", "2, 2, 2")])
def test_train_mesh_accepts_auto_and_sizes(value, stored):
    from opsd_jax.config import config_from_dict

    config = config_from_dict({"train": {"mesh": value}})
    assert config.train.mesh == stored and is_auto_mesh(config.train.mesh) == (stored == "auto")


@pytest.mark.parametrize("value", ["2,2", "1,-1,-1", "0,1,8", "a,b,c", "automatic", "8"])
def test_train_mesh_rejects_other_values_naming_the_field(value):
    with pytest.raises(ConfigKeyError, match=r"^train\.mesh: "):
        load_config(None, [f"train.mesh={value}"])
