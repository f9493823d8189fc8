"""opsd-jax: on-policy distillation and privileged on-policy self-distillation in JAX.

Stable public API: `load_hf`, `save_hf`, `forward`, `forward_hidden`, `ModelConfig`.
Attributes load lazily so the command line can configure jax's devices before jax is imported.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_hf": "opsd_jax.checkpoint.hf",
    "save_hf": "opsd_jax.checkpoint.hf",
    "forward": "opsd_jax.models.decoder",
    "forward_hidden": "opsd_jax.models.decoder",
    "ModelConfig": "opsd_jax.models.config",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'opsd_jax' has no attribute {name!r}")
