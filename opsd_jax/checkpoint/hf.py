"""Hugging Face safetensors <-> opsd-jax parameter pytrees.

Import streams tensor by tensor straight onto NamedShardings: a tensor is read, transposed into
our layout, placed in its shards and dropped before the next one is read, so host memory holds
one tensor beyond the placed parameters. Export writes a folder transformers loads; HF -> JAX ->
HF is bit-exact in the checkpoint's own dtype.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from opsd_jax.checkpoint.atomic import atomic_directory
from opsd_jax.models.config import ModelConfig
from opsd_jax.models.decoder import abstract_params, layer_period, param_shardings
from opsd_jax.paths import user_path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files beside the weights that make an exported folder usable on its own.
SIDE_FILE_PATTERNS = (
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template*",
)
# Buffers some exporters write that carry no learned values.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the model its config describes; names file/tensor."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One HF tensor and the parameter it becomes.

    kind "linear": HF [out, in] weight <-> our kernel of `shape`, whose first `contract_dims`
    dims are the input. kind "same": identical values, possibly reshaped. A decoder layer's
    tensor is row `block` of the stacked parameter at `path` (see `decoder.LayerBlock`).
    """

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    kind: str
    contract_dims: int = 1
    block: int | None = None

    @property
    def group(self) -> tuple[str, ...]:
        return group_path(self.path)

    def to_jax(self, hf_value: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return np.ascontiguousarray(hf_value.T).reshape(self.shape)
        return hf_value.reshape(self.shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            inputs = math.prod(self.shape[: self.contract_dims])
            return np.ascontiguousarray(value.reshape(inputs, -1).T)
        return value.reshape(self.hf_shape)


def group_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """The unit a conversion streams: a top-level parameter (embedding, final_norm, lm_head), or
    one stacked leaf of the layers (all blocks of, say, layers_0/mlp/gate_proj/kernel), so that
    neither side ever holds more than one such array beyond what it has placed."""
    return path if path[0] == "layers" else path[:1]


def group_name(group: tuple[str, ...]) -> str:
    return ".".join(group)


def param_groups(config: ModelConfig) -> list[tuple[str, ...]]:
    """Every group of `config`'s parameters, in the order conversions stream them."""
    return list(dict.fromkeys(m.group for m in tensor_mappings(config)))


def tensor_mappings(config: ModelConfig) -> list[TensorMapping]:
    """Every HF tensor of `config`'s architecture, grouped by `group_path` (one stacked leaf's
    layers together, in layer order), the order exports write them."""
    c = config
    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    H, K, Dh = c.num_heads, c.num_kv_heads, c.head_dim
    period = layer_period(c)
    layer_mappings: list[TensorMapping] = []
    for i in range(c.num_layers):
        hf = f"model.layers.{i}"
        layer = ("layers", f"layers_{i % period}")
        block = i // period

        def linear(hf_module, path, shape, contract_dims=1):
            inputs = math.prod(shape[:contract_dims])
            outputs = math.prod(shape[contract_dims:])
            return TensorMapping(
                f"{hf}.{hf_module}.weight", (*layer, *path, "kernel"), (outputs, inputs), shape,
                "linear", contract_dims, block,
            )

        def same(hf_tensor, path, shape):
            return TensorMapping(f"{hf}.{hf_tensor}", (*layer, *path), (math.prod(shape),), shape, "same",
                                 block=block)

        for name, heads in (("q_proj", H), ("k_proj", K), ("v_proj", K)):
            layer_mappings.append(linear(f"self_attn.{name}", ("attention", name), (D, heads, Dh)))
            if c.attention_bias:
                layer_mappings.append(same(f"self_attn.{name}.bias", ("attention", name, "bias"), (heads, Dh)))
        layer_mappings.append(linear("self_attn.o_proj", ("attention", "o_proj"), (H, Dh, D), contract_dims=2))
        if c.attention_bias:
            layer_mappings.append(same("self_attn.o_proj.bias", ("attention", "o_proj", "bias"), (D,)))
        if c.qk_norm == "per_head":
            layer_mappings.append(same("self_attn.q_norm.weight", ("attention", "q_norm", "scale"), (Dh,)))
            layer_mappings.append(same("self_attn.k_norm.weight", ("attention", "k_norm", "scale"), (Dh,)))
        else:
            layer_mappings.append(same("self_attn.q_norm.weight", ("attention", "q_norm", "scale"), (H, Dh)))
            layer_mappings.append(same("self_attn.k_norm.weight", ("attention", "k_norm", "scale"), (K, Dh)))
        layer_mappings.append(linear("mlp.gate_proj", ("mlp", "gate_proj"), (D, F)))
        layer_mappings.append(linear("mlp.up_proj", ("mlp", "up_proj"), (D, F)))
        layer_mappings.append(linear("mlp.down_proj", ("mlp", "down_proj"), (F, D)))
        if c.norm_placement == "pre":
            norms = (("input_layernorm", "pre_attention_norm"), ("post_attention_layernorm", "pre_mlp_norm"))
        else:
            norms = (
                ("post_attention_layernorm", "post_attention_norm"),
                ("post_feedforward_layernorm", "post_mlp_norm"),
            )
        for hf_norm, our_norm in norms:
            layer_mappings.append(same(f"{hf_norm}.weight", (our_norm, "scale"), (D,)))
    out = [TensorMapping("model.embed_tokens.weight", ("embedding",), (V, D), (V, D), "same")]
    leaf_order = list(dict.fromkeys(m.path for m in layer_mappings))
    out += sorted(layer_mappings, key=lambda m: (leaf_order.index(m.path), m.block))
    out.append(TensorMapping("model.norm.weight", ("final_norm", "scale"), (D,), (D,), "same"))
    if not c.tie_word_embeddings:
        out.append(TensorMapping("lm_head.weight", ("lm_head",), (V, D), (D, V), "linear"))
    return out


def _numpy_dtype(name: str):
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _weight_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file holding it, from the index or the files' headers."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
        for name, file in weight_map.items():
            if not os.path.exists(os.path.join(path, file)):
                raise CheckpointError(f"{index_path}: tensor {name!r} points to missing file {file}")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
    owners: dict[str, str] = {}
    for file in files:
        with _open_safetensors(file) as handle:
            for name in handle.keys():
                owners[name] = file
    return owners


def _open_safetensors(file: str):
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e}); is it truncated?") from None


def _header_shapes(owners: dict[str, str]) -> dict[str, tuple[int, ...]]:
    by_file: dict[str, list[str]] = {}
    for name, file in owners.items():
        by_file.setdefault(file, []).append(name)
    shapes = {}
    for file, names in by_file.items():
        with _open_safetensors(file) as handle:
            present = set(handle.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{file}: the index lists tensor {name!r} but the file lacks it")
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _check_tensors(path: str, config: ModelConfig, mappings, owners, shapes) -> None:
    """Fails before anything is loaded or written if a tensor is missing, extra or misshapen."""
    expected = {m.hf_name for m in mappings}
    missing = [m.hf_name for m in mappings if m.hf_name not in owners]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing tensor(s) {shown}")
    for m in mappings:
        if shapes[m.hf_name] != m.hf_shape:
            raise CheckpointError(
                f"{owners[m.hf_name]}: tensor {m.hf_name!r} has shape {list(shapes[m.hf_name])}, "
                f"but config.json implies {list(m.hf_shape)}"
            )
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = [
        name
        for name in owners
        if name not in expected and name not in ignorable and not name.endswith(_IGNORED_SUFFIXES)
    ]
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5])
        raise CheckpointError(
            f"{path}: tensor(s) {shown} are not part of a {config.model_type} model as its "
            "config.json describes it"
        )


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _leaf(params, path: tuple[str, ...]):
    """The parameter at `path` of a nested dict, or of a mapping from group names to groups (a
    lazily restored checkpoint, which then restores only that group)."""
    if isinstance(params, dict):
        return get_path(params, path)
    group = group_path(path)
    return get_path(params[group_name(group)], path[len(group):])


def _read_tensor(file: str, name: str) -> np.ndarray:
    # Opened per tensor: the file is memory-mapped, and closing it returns the mapped pages, so
    # resident memory never grows to the size of a shard.
    try:
        with _open_safetensors(file) as handle:
            return handle.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None


def load_hf_groups(path, *, dtype: str = "float32", mesh=None, compute_dtype: str | None = None,
                   progress=True):
    """Validates an HF checkpoint directory, then returns (ModelConfig, iterator) where the
    iterator yields (group name, parameters) one `group_path` group at a time (the embedding,
    each stacked layer leaf, the final norm, the head), placed on `mesh` (default: a one-device
    mesh).

    A consumer that writes each group and drops it (the Orbax converter) never holds the whole
    model. Every tensor name and shape is checked before the first one is read.
    """
    from opsd_jax.parallel import make_mesh

    path = user_path(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected an HF checkpoint folder)")
    numpy_dtype = _numpy_dtype(dtype)
    config = ModelConfig.from_hf(path, param_dtype=dtype, compute_dtype=compute_dtype or dtype)
    config = config.replace(source_path=path)
    mappings = tensor_mappings(config)
    owners = _weight_files(path)
    _check_tensors(path, config, mappings, owners, _header_shapes(owners))
    mesh = mesh if mesh is not None else make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shardings = param_shardings(config, mesh)

    def groups():
        bar = tqdm(total=len(mappings), desc=f"loading {os.path.basename(path) or path}", disable=not progress)
        for group, members in itertools.groupby(mappings, key=lambda m: m.group):
            subtree: dict = {}
            for leaf_path, tensors in itertools.groupby(members, key=lambda m: m.path):
                tensors = list(tensors)
                if tensors[0].block is None:
                    (m,) = tensors
                    value = m.to_jax(_read_tensor(owners[m.hf_name], m.hf_name)).astype(numpy_dtype, copy=False)
                else:  # a stacked leaf: its layers' tensors, one row each
                    value = np.empty((len(tensors), *tensors[0].shape), numpy_dtype)
                    for m in tensors:
                        value[m.block] = m.to_jax(_read_tensor(owners[m.hf_name], m.hf_name))
                placed = jax.make_array_from_callback(value.shape, get_path(shardings, leaf_path), value.__getitem__)
                del value
                if leaf_path == group:
                    subtree = placed
                else:
                    set_path(subtree, leaf_path[len(group):], placed)
                bar.update(len(tensors))
            yield group_name(group), subtree
        bar.close()

    return config, groups()


def load_hf(path, *, dtype: str = "float32", mesh=None, compute_dtype: str | None = None, progress=True):
    """Loads an HF checkpoint directory onto `mesh` (default: a one-device mesh), tensor by tensor.

    Returns (ModelConfig, params). `dtype` is the parameter dtype; `compute_dtype` (default:
    `dtype`) the activations'. Raises CheckpointError / ConfigError naming the file or tensor.
    """
    config, groups = load_hf_groups(path, dtype=dtype, mesh=mesh, compute_dtype=compute_dtype, progress=progress)
    params: dict = {}
    for group, (_, subtree) in zip(param_groups(config), groups, strict=True):
        set_path(params, group, subtree)
    return config, params


def _host_value(array) -> np.ndarray:
    if jax.process_count() > 1 and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


if sys.byteorder != "little":
    raise ImportError("opsd_jax.checkpoint.hf writes safetensors' little-endian bytes directly")
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _write_safetensors(file: str, mappings: list[TensorMapping], dtype: str, values: Iterator[np.ndarray]) -> None:
    """Writes one safetensors file tensor by tensor.

    safetensors' own writers take every tensor of a file in memory at once; the format is a JSON
    header of shapes and byte offsets followed by raw little-endian bytes, so with shapes known up
    front each tensor can be streamed and dropped. Files are read back with the safetensors
    library in the tests.
    """
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for mapping in mappings:
        nbytes = math.prod(mapping.hf_shape) * itemsize
        header[mapping.hf_name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(mapping.hf_shape), "data_offsets": [offset, offset + nbytes]
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # tensor data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for mapping, value in zip(mappings, values, strict=True):
            if value.shape != mapping.hf_shape:
                raise CheckpointError(f"tensor {mapping.hf_name!r} has shape {value.shape}, expected {mapping.hf_shape}")
            np.ascontiguousarray(value).tofile(f)  # raw bytes, no copy; hosts are little-endian


def _shard_plan(config: ModelConfig, dtype: str, max_shard_bytes: int) -> list[tuple[str, list[TensorMapping]]]:
    """(file name, tensors) per shard, HF's naming; one unsharded file when everything fits."""
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    shards: list[list[TensorMapping]] = []
    shard_bytes = 0
    for mapping in tensor_mappings(config):
        nbytes = math.prod(mapping.hf_shape) * itemsize
        if not shards or (shard_bytes and shard_bytes + nbytes > max_shard_bytes):
            shards.append([])
            shard_bytes = 0
        shards[-1].append(mapping)
        shard_bytes += nbytes
    if len(shards) == 1:
        return [(SINGLE_FILE, shards[0])]
    return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards)]


def copy_side_files(source: str | None, destination: str) -> list[str]:
    """Copies tokenizer, chat template and generation_config files; returns their names."""
    if not source or not os.path.isdir(source):
        return []
    copied = []
    for pattern in SIDE_FILE_PATTERNS:
        for file in sorted(glob.glob(os.path.join(source, pattern))):
            if os.path.isfile(file):
                shutil.copy2(file, os.path.join(destination, os.path.basename(file)))
                copied.append(os.path.basename(file))
    return copied


def _check_params(config: ModelConfig, params) -> None:
    shapes, _ = abstract_params(config)
    if jax.tree.structure(shapes) != jax.tree.structure(params):
        raise CheckpointError("params do not have the structure of the model that config describes")
    for (key_path, want), got in zip(jax.tree.leaves_with_path(shapes), jax.tree.leaves(params)):
        if tuple(want.shape) != tuple(got.shape):
            raise CheckpointError(
                f"param {jax.tree_util.keystr(key_path)} has shape {tuple(got.shape)}, "
                f"expected {tuple(want.shape)}"
            )


def save_hf(
    params,
    config: ModelConfig,
    path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    side_files_from: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Writes an HF checkpoint folder: config.json, safetensors (sharded with an index when over
    `max_shard_bytes`), and the tokenizer / generation_config files of `side_files_from`
    (default: the folder the config was loaded from).

    `dtype` defaults to the checkpoint's original dtype. The folder appears only when complete.
    """
    path = user_path(path)
    dtype = dtype or config.hf_dtype
    numpy_dtype = _numpy_dtype(dtype)
    if isinstance(params, dict):
        _check_params(config, params)  # lazily restored groups were shape-checked by their restore
    hf_config = config.hf_config
    hf_config["dtype"] = dtype
    hf_config.pop("torch_dtype", None)
    with atomic_directory(path, overwrite=overwrite) as staging:
        if staging is None:  # another process of a multi-host job writes
            for leaf_path in dict.fromkeys(m.path for m in tensor_mappings(config)):
                _host_value(_leaf(params, leaf_path))  # joins the writer's all-gathers, one per leaf
            return path
        copy_side_files(side_files_from or config.source_path, staging)
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        plan = _shard_plan(config, dtype, max_shard_bytes)
        bar = tqdm(total=sum(len(t) for _, t in plan), desc=f"writing {os.path.basename(path)}",
                   disable=not progress)

        host_leaf: dict = {}  # the one leaf being written: a stacked leaf is fetched once, not per layer

        def hf_values(mappings):
            for m in mappings:
                if m.path not in host_leaf:
                    host_leaf.clear()
                    host_leaf[m.path] = _host_value(_leaf(params, m.path))
                value = host_leaf[m.path] if m.block is None else host_leaf[m.path][m.block]
                yield m.to_hf(value).astype(numpy_dtype, copy=False)
                bar.update(1)

        for file_name, mappings in plan:
            _write_safetensors(os.path.join(staging, file_name), mappings, dtype, hf_values(mappings))
        bar.close()
        if len(plan) > 1:
            total_bytes = sum(math.prod(m.hf_shape) for _, ms in plan for m in ms) * np.dtype(numpy_dtype).itemsize
            weight_map = {m.hf_name: file_name for file_name, ms in plan for m in ms}
            index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
            with open(os.path.join(staging, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
    return path

