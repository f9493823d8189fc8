"""Loading a model for generation: config, weights, tokenizer and stop token ids from an HF folder
or an opsd-jax Orbax checkpoint. The trainer, the evaluator, the analysis and the server share it."""

from __future__ import annotations

import json
import os

from opsd_jax.paths import user_path


def default_stop_token_ids(tokenizer, checkpoint_dir: str | None) -> tuple[int, ...]:
    """The tokenizer's eos plus generation_config's eos_token_id(s) (Qwen3: <|im_end|> and
    <|endoftext|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = os.path.join(checkpoint_dir, "generation_config.json") if checkpoint_dir else None
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return tuple(sorted(ids))


def load_for_serving(checkpoint: str, *, dtype: str = "float32", mesh=None):
    """(ModelConfig, params, tokenizer, folder with the tokenizer files) from an HF folder or an
    opsd-jax Orbax checkpoint."""
    from opsd_jax.checkpoint.hf import load_hf
    from opsd_jax.checkpoint.orbax import is_model_checkpoint, restore_params

    checkpoint = user_path(checkpoint)
    if is_model_checkpoint(checkpoint):
        config, params = restore_params(checkpoint, mesh=mesh, dtype=dtype)
    else:
        config, params = load_hf(checkpoint, dtype=dtype, mesh=mesh)
    tokenizer, side_dir = load_tokenizer(checkpoint)
    return config, params, tokenizer, side_dir


def load_tokenizer(checkpoint: str):
    """(tokenizer, the folder holding its files) of an HF folder or an opsd-jax Orbax checkpoint;
    FileNotFoundError naming the folder when it has none."""
    import transformers

    from opsd_jax.checkpoint.orbax import config_folder

    side_dir = config_folder(user_path(checkpoint))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(side_dir)
    except Exception as e:  # noqa: BLE001 - say which folder lacks what
        raise FileNotFoundError(f"{side_dir}: no usable tokenizer files ({e})") from None
    return tokenizer, side_dir
