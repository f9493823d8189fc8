"""Shared fixtures of the trainer tests."""

import pytest

from opsd_jax.testing import save_tiny_hf_model, save_tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model_seed):
    """A tiny random Qwen3 student with a small chat tokenizer, fresh for each test module."""
    path = tmp_path_factory.mktemp("student")
    save_tiny_hf_model("qwen3", str(path), seed=model_seed)
    save_tiny_tokenizer(str(path))
    return str(path)
