"""Model parameters in Orbax: sharded writes, restorable onto any mesh shape.

Layout of a model checkpoint directory:
    params/GROUP/ one Orbax (tensorstore/OCDBT) pytree per parameter group (`hf.group_path`:
                  embedding, each stacked layer leaf such as layers.layers_0.mlp.gate_proj.kernel,
                  final_norm, lm_head), so conversions stream group by group
    hf/           config.json plus tokenizer and generation_config files, so an export to HF and
                  the sampler's prompts need nothing else
    opsd_jax.json parameter dtype and layout version
"""

from __future__ import annotations

import collections.abc
import json
import os

import jax
import orbax.checkpoint as ocp

from opsd_jax.checkpoint.atomic import atomic_directory
from opsd_jax.checkpoint.hf import (
    CheckpointError,
    copy_side_files,
    get_path,
    group_name,
    param_groups,
    set_path,
)
from opsd_jax.models.config import ModelConfig
from opsd_jax.models.decoder import sharded_abstract_params
from opsd_jax.paths import user_path

# 3: layers stacked for the scanned decoder, one group per stacked leaf. 2 (one group per layer)
# is refused with the command that rewrites it.
LAYOUT_VERSION = 3
PARAMS_DIR = "params"
HF_DIR = "hf"
MANIFEST = "opsd_jax.json"


def _checkpointer(tree, host_buffer_gb: float | None = None) -> ocp.Checkpointer:
    """An Orbax checkpointer whose host memory in flight is bounded.

    Orbax's defaults (96 GB in flight) copy every array to host at once, which on a CPU host
    doubles a conversion's footprint. By default the bound is just above the largest array, the
    smallest bound Orbax accepts (it refuses a single array larger than the bound).
    """
    if host_buffer_gb is None:
        largest = max((leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)), default=0)
        host_buffer_gb = max(1.05 * largest, 2**26) / 1e9  # Orbax counts GB as 1e9 bytes
    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=host_buffer_gb,
        restore_concurrent_gb=host_buffer_gb,
        save_device_host_concurrent_gb=host_buffer_gb,
    )
    return ocp.Checkpointer(handler)


def save_param_groups(groups, config: ModelConfig, path, *, overwrite: bool = False) -> str:
    """Writes (group name, parameters) pairs one at a time; a group can be dropped by its producer
    as soon as it is written. The directory appears complete or not at all."""
    path = user_path(path)
    dtypes, names = set(), []
    with atomic_directory(path, overwrite=overwrite, all_processes=True) as staging:
        for name, subtree in groups:
            dtypes.update(str(leaf.dtype) for leaf in jax.tree.leaves(subtree))
            if len(dtypes) != 1:
                raise CheckpointError(f"params mix dtypes {sorted(dtypes)}; cast them to one dtype first")
            tree = {name: subtree}
            with _checkpointer(tree) as checkpointer:
                checkpointer.save(os.path.join(staging, PARAMS_DIR, name), args=ocp.args.PyTreeSave(tree))
            names.append(name)
            del tree, subtree
        if jax.process_index() == 0:
            hf_dir = os.path.join(staging, HF_DIR)
            os.makedirs(hf_dir)
            copy_side_files(config.source_path, hf_dir)
            with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config.hf_config, f, indent=2, sort_keys=True)
            with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
                json.dump({"layout_version": LAYOUT_VERSION, "param_dtype": dtypes.pop(), "groups": names}, f)
    return path


def save_params(params, config: ModelConfig, path, *, overwrite: bool = False) -> str:
    """Writes `params` (sharded jax arrays) with their config; the directory appears complete or
    not at all."""
    groups = ((group_name(group), get_path(params, group)) for group in param_groups(config))
    return save_param_groups(groups, config, path, overwrite=overwrite)


def is_model_checkpoint(path) -> bool:
    """Whether `path` is an opsd-jax model checkpoint (rather than an HF folder)."""
    return os.path.exists(os.path.join(user_path(path), MANIFEST))


def config_folder(path) -> str:
    """The folder with the config.json and tokenizer files of `path`: an opsd-jax checkpoint's hf/
    copy, or an HF folder itself."""
    path = user_path(path)
    return os.path.join(path, HF_DIR) if is_model_checkpoint(path) else path


def read_manifest(path) -> dict:
    manifest_path = os.path.join(user_path(path), MANIFEST)
    if not os.path.exists(manifest_path):
        raise CheckpointError(
            f"{manifest_path} not found: {path} is not an opsd-jax model checkpoint "
            "(written by `opsd-jax convert --to-orbax`)"
        )
    with open(manifest_path, encoding="utf-8") as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{manifest_path} is not valid JSON ({e}): a damaged checkpoint; write it "
                                  "again with `opsd-jax convert --to-orbax`") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("layout_version")
    if version == 2:
        raise CheckpointError(
            f"{manifest_path}: layout_version 2 (one group per unstacked layer) predates the scanned "
            "decoder; rewrite it with this version: `opsd-jax convert --from-hf <the HF folder> --to-orbax "
            f"{path}` (or export it to HF with the version that wrote it first)"
        )
    if version != LAYOUT_VERSION:
        raise CheckpointError(f"{manifest_path}: unknown layout_version {version!r}")
    return manifest


class LazyParams(collections.abc.Mapping):
    """Parameter groups restored on first access, only the latest one kept: an export can stream
    a checkpoint larger than host memory group by group."""

    def __init__(self, restore_group, names):
        self._restore_group = restore_group
        self._names = list(names)
        self._cached: tuple[str, object] | None = None

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # drop the previous group before restoring the next
            self._cached = (name, self._restore_group(name))
        return self._cached[1]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def restore_params_lazily(path, *, mesh=None, dtype: str | None = None, compute_dtype: str | None = None):
    """(ModelConfig, LazyParams) onto `mesh` (default: one device), whatever mesh saved them.

    `dtype` casts the parameters on restore (default: the dtype they were saved in).
    """
    from opsd_jax.parallel import make_mesh

    path = user_path(path)
    manifest = read_manifest(path)
    dtype = dtype or manifest["param_dtype"]
    hf_dir = os.path.join(path, HF_DIR)
    config = ModelConfig.from_hf(hf_dir, param_dtype=dtype, compute_dtype=compute_dtype or dtype)
    config = config.replace(source_path=hf_dir)
    mesh = mesh if mesh is not None else make_mesh(1, 1, 1, devices=jax.devices()[:1])
    target = sharded_abstract_params(config, mesh)
    groups = {group_name(group): group for group in param_groups(config)}
    expected = sorted(groups)
    if sorted(manifest.get("groups", [])) != expected:
        raise CheckpointError(
            f"{path}: parameter groups {sorted(manifest.get('groups', []))} do not match the model "
            f"its config describes ({expected})"
        )

    def restore_group(name):
        tree = {name: get_path(target, groups[name])}
        restore_args = ocp.checkpoint_utils.construct_restore_args(tree)
        with _checkpointer(tree) as checkpointer:
            restored = checkpointer.restore(
                os.path.join(path, PARAMS_DIR, name), args=ocp.args.PyTreeRestore(tree, restore_args=restore_args)
            )
        return restored[name]

    return config, LazyParams(restore_group, manifest["groups"])


def restore_params(path, *, mesh=None, dtype: str | None = None, compute_dtype: str | None = None):
    """Restores (ModelConfig, params) onto `mesh` (default: one device), whatever mesh saved them.

    `dtype` casts the parameters on restore (default: the dtype they were saved in).
    """
    config, lazy = restore_params_lazily(path, mesh=mesh, dtype=dtype, compute_dtype=compute_dtype)
    params: dict = {}
    for group in param_groups(config):
        set_path(params, group, lazy[group_name(group)])
    return config, params
