"""Models: ModelConfig from HF config.json, and one decoder covering Qwen3 / OLMo-2 / OLMo-3."""

from opsd_jax.models.config import (
    SUPPORTED_MODEL_TYPES,
    ConfigError,
    ModelConfig,
    RopeConfig,
)
from opsd_jax.models.decoder import (
    CACHE_LOGICAL_AXES,
    PAGE_POOL_LOGICAL_AXES,
    Decoder,
    abstract_params,
    forward,
    forward_hidden,
    forward_hidden_with_cache,
    forward_hidden_with_pages,
    forward_with_cache,
    init_cache,
    init_page_pools,
    init_params,
    logits_from_hidden,
    param_shardings,
    sharded_abstract_params,
)

__all__ = [
    "CACHE_LOGICAL_AXES",
    "PAGE_POOL_LOGICAL_AXES",
    "SUPPORTED_MODEL_TYPES",
    "ConfigError",
    "Decoder",
    "ModelConfig",
    "RopeConfig",
    "abstract_params",
    "forward",
    "forward_hidden",
    "forward_hidden_with_cache",
    "forward_hidden_with_pages",
    "forward_with_cache",
    "init_cache",
    "init_page_pools",
    "init_params",
    "logits_from_hidden",
    "param_shardings",
    "sharded_abstract_params",
]
