"""Checkpoints: HF safetensors import/export (hf.py) and Orbax train-state storage (orbax.py)."""
