"""opsd-jax: on-policy distillation and privileged on-policy self-distillation in JAX.

Stable public API: `load_hf`, `save_hf`, `forward`, `forward_hidden`, `ModelConfig`.
"""

from opsd_jax.checkpoint.hf import load_hf, save_hf
from opsd_jax.models import ModelConfig, forward, forward_hidden

__version__ = "0.1.0"
__all__ = ["ModelConfig", "forward", "forward_hidden", "load_hf", "save_hf", "__version__"]
