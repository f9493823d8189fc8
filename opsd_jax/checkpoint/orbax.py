"""Model parameters in Orbax: sharded writes, restorable onto any mesh shape.

Layout of a model checkpoint directory:
    params/       Orbax (tensorstore/OCDBT) parameter pytree
    hf/           config.json plus tokenizer and generation_config files, so an export to HF and
                  the sampler's prompts need nothing else
    opsd_jax.json parameter dtype and layout version
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from opsd_jax.checkpoint.atomic import atomic_directory
from opsd_jax.checkpoint.hf import CheckpointError, copy_side_files
from opsd_jax.models.config import ModelConfig
from opsd_jax.models.decoder import abstract_params, param_shardings

LAYOUT_VERSION = 1
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


def save_params(params, config: ModelConfig, path, *, overwrite: bool = False) -> str:
    """Writes `params` (sharded jax arrays) with their config; the directory appears complete or
    not at all."""
    path = os.fspath(path)
    dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(params)}
    if len(dtypes) != 1:
        raise CheckpointError(f"params mix dtypes {sorted(dtypes)}; cast them to one dtype first")
    with atomic_directory(path, overwrite=overwrite, all_processes=True) as staging:
        with _checkpointer(params) as checkpointer:
            checkpointer.save(os.path.join(staging, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
        if jax.process_index() == 0:
            hf_dir = os.path.join(staging, HF_DIR)
            os.makedirs(hf_dir)
            copy_side_files(config.source_path, hf_dir)
            with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config.hf_config, f, indent=2, sort_keys=True)
            with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
                json.dump({"layout_version": LAYOUT_VERSION, "param_dtype": dtypes.pop()}, f)
    return path


def read_manifest(path) -> dict:
    manifest_path = os.path.join(os.fspath(path), MANIFEST)
    if not os.path.exists(manifest_path):
        raise CheckpointError(
            f"{manifest_path} not found: {path} is not an opsd-jax model checkpoint "
            "(written by `opsd-jax convert --to-orbax`)"
        )
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(f"{manifest_path}: unknown layout_version {manifest.get('layout_version')!r}")
    return manifest


def restore_params(path, *, mesh=None, dtype: str | None = None, compute_dtype: str | None = None):
    """Restores (ModelConfig, params) onto `mesh` (default: one device), whatever mesh saved them.

    `dtype` casts the parameters on restore (default: the dtype they were saved in).
    """
    from opsd_jax.parallel import make_mesh

    path = os.fspath(path)
    manifest = read_manifest(path)
    dtype = dtype or manifest["param_dtype"]
    hf_dir = os.path.join(path, HF_DIR)
    config = ModelConfig.from_hf(hf_dir, param_dtype=dtype, compute_dtype=compute_dtype or dtype)
    config = config.replace(source_path=hf_dir)
    mesh = mesh if mesh is not None else make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shapes, _ = abstract_params(config)
    target = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, dtype, sharding=sharding),
        shapes,
        param_shardings(config, mesh),
    )
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with _checkpointer(target) as checkpointer:
        params = checkpointer.restore(
            os.path.join(path, PARAMS_DIR), args=ocp.args.PyTreeRestore(target, restore_args=restore_args)
        )
    return config, params
