"""ModelConfig: the decoder's switches, read from a Hugging Face config.json.

A model is data: Qwen3, OLMo-2 and OLMo-3 differ only in the values of these fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3", "olmo2", "olmo3")
LAYER_TYPES = ("full_attention", "sliding_attention")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
# The backends of opsd_jax.models.attention.attend (a runtime setting, not a checkpoint field).
ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "chunked", "cudnn", "splash")
# What a rematerialized layer keeps for the backward pass (opsd_jax.models.decoder._remat_policy).
REMAT_POLICIES = ("full", "dots", "offload")

# transformers' per-architecture defaults for fields a config.json may omit.
_DEFAULT_ROPE_THETA = {"qwen3": 10_000.0, "olmo2": 10_000.0, "olmo3": 500_000.0}
_DEFAULT_RMS_NORM_EPS = {"qwen3": 1e-6, "olmo2": 1e-5, "olmo3": 1e-5}


class ConfigError(ValueError):
    """A config.json that cannot describe a supported model; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters of one layer type (NeoX rotate-half layout)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs; hashable so it can be a static jit argument.

    `norm_placement`: "pre" (Qwen3: RMSNorm on the input of attention and MLP) or "post"
    (OLMo-2/3: RMSNorm on their outputs, inside the residual). `qk_norm`: "per_head" (Qwen3: one
    RMSNorm over head_dim shared by all heads) or "full" (OLMo: over the whole projection).
    `rope_by_layer_type` pairs each layer type with its RopeConfig.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    norm_placement: str
    qk_norm: str
    norm_weight_in_fp32: bool
    layer_types: tuple[str, ...]
    sliding_window: int | None
    rope_by_layer_type: tuple[tuple[str, RopeConfig], ...]
    max_position_embeddings: int
    # Runtime settings, not read from the checkpoint.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    # With remat: "full" saves nothing inside a layer, "dots" saves its matmul outputs, "offload"
    # moves those to host memory (where the platform has it) instead of recomputing them.
    remat_policy: str = "full"
    # Training forward as one scan over the layer pattern (compile time flat in depth), or a loop
    # over the same stacked parameters (XLA sees every layer: on TPU it needed less memory for
    # OLMo-3's dense step, see BUILD_NOTES "Layers scanned").
    scan_layers: bool = True
    # "auto": cuDNN flash attention on GPU where it applies, splash on TPU under a mesh where it
    # applies, else the chunked online softmax; "dense" materializes [T, S] scores (the oracle).
    # Never written to config.json.
    attention_implementation: str = "auto"
    # Query and key tile length of the chunked backend: memory O(T * block) per head.
    attention_block_size: int = 512
    # The checkpoint's config.json, kept verbatim (as JSON text, so the dataclass stays hashable)
    # so an export writes back exactly what was read.
    hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)
    # Where the checkpoint was read from: its tokenizer and generation_config travel on export.
    source_path: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(
                f"ModelConfig: field 'attention_implementation' is {self.attention_implementation!r}; "
                f"supported: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(
                f"ModelConfig: field 'remat_policy' is {self.remat_policy!r}; supported: {', '.join(REMAT_POLICIES)}"
            )
        block = self.attention_block_size
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ConfigError(f"ModelConfig: field 'attention_block_size' must be a positive integer, got {block!r}")

    @property
    def rope(self) -> dict[str, RopeConfig]:
        return dict(self.rope_by_layer_type)

    @property
    def hf_config(self) -> dict[str, Any]:
        return json.loads(self.hf_config_json)

    @property
    def hf_dtype(self) -> str:
        """The dtype the checkpoint was stored in ("bfloat16", "float32", ...)."""
        hf = self.hf_config
        return str(hf.get("dtype") or hf.get("torch_dtype") or "float32")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **runtime) -> ModelConfig:
        """Reads an HF checkpoint directory (its config.json) or an already-parsed config dict.

        `runtime` sets param_dtype, compute_dtype, remat, remat_policy, scan_layers, attention_implementation
        and attention_block_size.
        """
        if isinstance(source, Mapping):
            return _from_dict(dict(source), "config dict", runtime)
        path = os.fspath(source)
        config_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(config_path):
            raise FileNotFoundError(
                f"{config_path} not found: an HF checkpoint directory must contain config.json"
            )
        try:
            with open(config_path, encoding="utf-8") as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_path} is not valid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{config_path} must hold a JSON object, got {type(hf).__name__}")
        return _from_dict(hf, config_path, runtime)


def _require(hf: Mapping[str, Any], field: str, where: str, kind=int):
    if field not in hf or hf[field] is None:
        raise ConfigError(f"{where}: required field {field!r} is missing")
    value = hf[field]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"{where}: field {field!r} must be a positive integer, got {value!r}")
    return value


def _from_dict(hf: dict[str, Any], where: str, runtime: Mapping[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{where}: unsupported model_type {model_type!r}; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hidden_size = _require(hf, "hidden_size", where)
    num_heads = _require(hf, "num_attention_heads", where)
    num_layers = _require(hf, "num_hidden_layers", where)
    num_kv_heads = hf.get("num_key_value_heads") or num_heads
    head_dim = hf.get("head_dim") or hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise ConfigError(
            f"{where}: num_attention_heads ({num_heads}) must be a multiple of "
            f"num_key_value_heads ({num_kv_heads})"
        )
    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
        raise ConfigError(f"{where}: field 'hidden_act' must be 'silu', got {activation!r}")

    if model_type == "qwen3":
        sliding_window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    else:
        sliding_window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if model_type == "olmo3":
            layer_types = [
                "sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(num_layers)
            ]
        elif model_type == "qwen3" and sliding_window is not None:
            first_window_layer = hf.get("max_window_layers", 28)
            layer_types = [
                "sliding_attention" if i >= first_window_layer else "full_attention"
                for i in range(num_layers)
            ]
        else:
            layer_types = ["full_attention"] * num_layers
    layer_types = tuple(layer_types)
    if len(layer_types) != num_layers:
        raise ConfigError(
            f"{where}: field 'layer_types' has {len(layer_types)} entries for "
            f"{num_layers} layers"
        )
    for i, kind in enumerate(layer_types):
        if kind not in LAYER_TYPES:
            raise ConfigError(
                f"{where}: layer_types[{i}] is {kind!r}; supported: {', '.join(LAYER_TYPES)}"
            )
    if "sliding_attention" in layer_types and not sliding_window:
        raise ConfigError(f"{where}: sliding_attention layers need a positive 'sliding_window'")

    is_olmo = model_type in ("olmo2", "olmo3")
    return ModelConfig(
        model_type=model_type,
        vocab_size=_require(hf, "vocab_size", where),
        hidden_size=hidden_size,
        intermediate_size=_require(hf, "intermediate_size", where),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", _DEFAULT_RMS_NORM_EPS[model_type])),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        norm_placement="post" if is_olmo else "pre",
        qk_norm="full" if is_olmo else "per_head",
        norm_weight_in_fp32=is_olmo,
        layer_types=layer_types,
        sliding_window=int(sliding_window) if sliding_window else None,
        rope_by_layer_type=tuple(sorted(_rope_by_layer_type(hf, model_type, layer_types, where).items())),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        hf_config_json=json.dumps(hf, sort_keys=True),
        **runtime,
    )


def _rope_by_layer_type(
    hf: Mapping[str, Any], model_type: str, layer_types: tuple[str, ...], where: str
) -> dict[str, RopeConfig]:
    """Reads both layouts: transformers-5 `rope_parameters` (flat, or nested per layer type) and the
    older top-level `rope_theta` / `rope_scaling` that hub checkpoints carry.

    OLMo-3 applies a top-level `rope_scaling` (YaRN) to full-attention layers only; its sliding
    layers keep default RoPE.
    """
    top_theta = hf.get("rope_theta")
    default_theta = float(top_theta if top_theta is not None else _DEFAULT_ROPE_THETA[model_type])
    parameters = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    present = sorted(set(layer_types))
    nested = isinstance(parameters, Mapping) and any(k in LAYER_TYPES for k in parameters)

    by_type: dict[str, dict[str, Any]] = {}
    for kind in present:
        if nested:
            entry = dict(parameters.get(kind) or {})
        elif isinstance(parameters, Mapping):
            entry = dict(parameters)
        else:
            entry = {}
        if scaling and not nested and not isinstance(parameters, Mapping):
            if model_type != "olmo3" or kind == "full_attention":
                entry.update(scaling)
        entry.setdefault("rope_theta", default_theta)
        by_type[kind] = entry
    return {
        kind: _rope_config(entry, hf, f"{where}: rope parameters of {kind}")
        for kind, entry in by_type.items()
    }


def _rope_config(entry: Mapping[str, Any], hf: Mapping[str, Any], where: str) -> RopeConfig:
    rope_type = entry.get("rope_type") or entry.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{where}: unsupported rope_type {rope_type!r}; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if entry.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor != 1 is not supported")
    factor = entry.get("factor")
    if rope_type != "default" and factor is None and rope_type != "yarn":
        raise ConfigError(f"{where}: rope_type {rope_type!r} needs 'factor'")
    original = entry.get("original_max_position_embeddings")
    if rope_type == "yarn":
        original = original or hf.get("original_max_position_embeddings") or hf.get(
            "max_position_embeddings"
        )
        if factor is None:
            factor = hf["max_position_embeddings"] / original
    return RopeConfig(
        theta=float(entry["rope_theta"]),
        rope_type=rope_type,
        factor=float(factor) if factor is not None else 1.0,
        original_max_position_embeddings=int(original) if original else None,
        beta_fast=float(entry.get("beta_fast") or 32.0),
        beta_slow=float(entry.get("beta_slow") or 1.0),
        attention_factor=entry.get("attention_factor"),
        mscale=entry.get("mscale"),
        mscale_all_dim=entry.get("mscale_all_dim"),
        truncate=bool(entry.get("truncate", True)),
    )
