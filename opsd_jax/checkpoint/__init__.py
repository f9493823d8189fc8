"""Checkpoints: HF safetensors import/export (hf.py), Orbax train-state storage (orbax.py), and
loading a model with its tokenizer and stop ids for generation (loading.py)."""

from opsd_jax.checkpoint.loading import default_stop_token_ids, load_for_serving

__all__ = ["default_stop_token_ids", "load_for_serving"]
