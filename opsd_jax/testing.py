"""Tiny random Hugging Face checkpoints, built with transformers, for tests and the CPU demo.

Needs torch (the `test` extra). Every weight, norms included, is random: transformers initializes
norms to one, which would hide a misplaced or mis-shaped norm.
"""

from __future__ import annotations

import numpy as np

TINY_ARCHITECTURES = {
    # GQA, head_dim (24) != hidden/heads (16), vocab not a multiple of 128, untied head.
    "qwen3": dict(
        model_type="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
        max_position_embeddings=512,
    ),
    "qwen3-tied": dict(
        model_type="qwen3", vocab_size=997, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
    "olmo2": dict(
        model_type="olmo2", vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=1, eos_token_id=2,
    ),
    # Sliding window (6) shorter than the test sequences; YaRN on full-attention layers only.
    "olmo3": dict(
        model_type="olmo3", vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=6, max_position_embeddings=128,
        rope_theta=10_000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        pad_token_id=1, eos_token_id=2,
    ),
}


def tiny_hf_config(name: str, **overrides):
    """A transformers config object for one of TINY_ARCHITECTURES."""
    import transformers

    fields = dict(TINY_ARCHITECTURES[name])
    fields.update(overrides)
    model_type = fields.pop("model_type")
    config_class = {
        "qwen3": transformers.Qwen3Config,
        "olmo2": transformers.Olmo2Config,
        "olmo3": transformers.Olmo3Config,
    }[model_type]
    return config_class(**fields)


def tiny_hf_model(name: str, *, seed: int, dtype: str = "float32", **overrides):
    """A transformers causal LM with every parameter drawn at random (eval mode, CPU)."""
    import torch
    import transformers

    config = tiny_hf_config(name, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param_name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=generator))
    return model.to(getattr(torch, dtype))


def save_tiny_hf_model(name: str, path: str, *, seed: int, dtype: str = "float32",
                       max_shard_size: str | None = None, **overrides):
    """Builds a tiny model and writes it with `save_pretrained`; returns the torch model."""
    model = tiny_hf_model(name, seed=seed, dtype=dtype, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None,
              positions: np.ndarray | None = None) -> np.ndarray:
    """transformers' float32 logits [batch, seq, vocab] for the same inputs we give `forward`."""
    import torch

    kwargs = {"input_ids": torch.as_tensor(tokens, dtype=torch.long)}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(attention_mask, dtype=torch.long)
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(positions, dtype=torch.long)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, lengths: list[int], vocab_size: int):
    """tokens, attention_mask and positions [batch, max(lengths)] for left-padded prompts."""
    width = max(lengths)
    tokens = rng.integers(0, vocab_size, (len(lengths), width))
    mask = np.zeros((len(lengths), width), np.int64)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return tokens, mask, positions


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def save_tiny_tokenizer(path: str, vocab_size: int = 400) -> None:
    """A byte-level BPE tokenizer trained here on a few sentences, with Qwen-style chat special
    tokens and chat template, plus a generation_config naming <|im_end|> and <|endoftext|> as eos.
    Its ids fit the tiny models' vocabularies."""
    import json
    import os

    import tokenizers
    import transformers

    corpus = [
        "Wait, let me check that again. Perhaps the answer is 42, but maybe not.",
        "Let me verify: 3 + 4 = 7, and 7 * 6 = 42. Actually, I think the total is 42.",
        "The quick brown fox jumps over the lazy dog. Alternatively, reconsider the problem.",
        "Return your final response within \\boxed{}. Thus the answer is \\boxed{12}.",
    ] * 20
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    model.train_from_iterator(corpus, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": eos, "pad_token_id": eos[1]}, f)


def qwen3_tokenizer_dir(destination: str) -> str:
    """Unpacks the real Qwen3 tokenizer kept in tests/assets into `destination`; returns it.

    Tests only: the files live in the source tree, not in the installed package.
    """
    import gzip
    import os
    import shutil

    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "assets",
                          "tokenizers", "qwen3")
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source} not found: the Qwen3 test tokenizer ships with the source tree")
    os.makedirs(destination, exist_ok=True)
    shutil.copy(os.path.join(source, "tokenizer_config.json"), destination)
    with gzip.open(os.path.join(source, "tokenizer.json.gz"), "rb") as packed, \
            open(os.path.join(destination, "tokenizer.json"), "wb") as unpacked:
        shutil.copyfileobj(packed, unpacked)
    return destination


def assert_greedy_matches(model, prompt_ids: list[int], token_ids: list[int], tie: float = 1e-4) -> None:
    """`token_ids` must be transformers' greedy continuation (`hf_greedy`) of `prompt_ids`, up to
    the first position where transformers' own top logits lie within `tie` of each other: there
    float32 rounding alone decides the argmax (a random tiny model met a 3.6e-7 gap), so a
    different choice among the tied tokens is accepted and the continuations part."""
    import torch

    reference = hf_greedy(model, prompt_ids, len(token_ids))
    if token_ids == reference:
        return
    i = next(k for k, (ours, theirs) in enumerate(zip(token_ids, reference)) if ours != theirs)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + reference[:i]])).logits[0, -1].double()
    gap = float(logits.max() - logits[token_ids[i]])
    assert gap <= tie, (f"greedy tokens differ at {i}: {token_ids[i]} where transformers picks {reference[i]}, "
                        f"whose logit is {gap:.3g} higher (not a tie within {tie})")


def hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy `generate` continuation of exactly `new_tokens` tokens, as a plain
    argmax decoder: an explicit all-ones attention mask (otherwise generate masks every prompt
    token equal to pad_token_id) and no eos (otherwise it stops, or with min_new_tokens
    suppresses the eos logit)."""
    import copy

    import torch

    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = []  # None falls back to the model config's eos
    if config.pad_token_id is None:  # generate would take it from the (now empty) eos list
        config.pad_token_id = 0
    config.update(max_new_tokens=new_tokens, min_new_tokens=None, do_sample=False)
    tokens = torch.tensor([prompt_ids])
    out = model.generate(tokens, attention_mask=torch.ones_like(tokens), generation_config=config)
    return out[0, len(prompt_ids):].tolist()
