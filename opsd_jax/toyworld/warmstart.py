"""Warm start of the toy world: supervised training (objective.kind=sft, the trainer's own step) of
three tiny Qwen3-architecture models on solver traces, written as Hugging Face checkpoints.

- thinker: a thinking model, trained on THINKER traces plus hinted traces;
- instruct: a non-thinking model, trained on direct answers plus hinted answers;
- teacher: a wider thinker trained on STRONG_THINKER traces (fewer slips, more verification),
  the stronger teacher of vanilla OPD.

The package ships the result (`opsd_jax/toyworld/checkpoints`, about 1 MB); `opsd-jax toyworld
warmstart OUT` regenerates it, and its manifest records the first losses of each run so a test
can check that regenerating reproduces them.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from opsd_jax.toyworld import world

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
MANIFEST = "manifest.json"
MODEL_VOCAB = 64  # the tokenizer's 40 ids, padded to a multiple the tensor axis can split
MAX_PROMPT_TOKENS = 24
MAX_RESPONSE_TOKENS = 112


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    name: str
    hidden: int
    layers: int
    thinking: bool
    solver: world.Solver
    steps: int
    problems: int
    seed: int


RECIPES = (
    ModelRecipe("thinker", hidden=64, layers=4, thinking=True, solver=world.THINKER, steps=500, problems=4000, seed=1),
    ModelRecipe("instruct", hidden=64, layers=4, thinking=False, solver=world.THINKER, steps=300, problems=4000,
                seed=2),
    # 1,000 steps, seed 5: the first teacher to clear the bar written before its run (`opsd-jax
    # toyworld vet-teacher`; BUILD_NOTES.md, "A teacher judged on intervals"). The 400-step seed-3
    # teacher shipped before strayed at the world's forced moves and gave up after a missed try.
    ModelRecipe("teacher", hidden=128, layers=4, thinking=True, solver=world.STRONG_THINKER, steps=1000,
                problems=4000, seed=5),
)


def held_out_problems(count: int, seed: int) -> list[world.Problem]:
    """Problems no warm-start run trains on (the experiment's training and evaluation sets)."""
    return world.generate_problems(count, np.random.default_rng([seed, 7]))


def sft_rows(recipe: ModelRecipe, exclude: set, rng: np.random.Generator) -> list[dict]:
    """Prompt/response rows: each problem once plain (twice for thinkers: search needs more
    examples than the hint) and once with a dense or a sparse hint."""
    rows = []
    for index, problem in enumerate(world.generate_problems(recipe.problems, rng, exclude)):
        if recipe.thinking:
            plain = [world.thinker_trace(problem, recipe.solver, rng) for _ in range(2)]
        else:
            plain = [world.instruct_trace(problem)]
        for k, trace in enumerate(plain):
            rows.append({"id": f"{recipe.name}-{index}-{k}", "problem": problem.text, "solution": trace,
                         "answer": str(problem.answer)})
        privilege = "dense" if rng.random() < 0.5 else "sparse"
        rows.append({"id": f"{recipe.name}-{index}-hint", "problem": world.hinted_prompt(problem, privilege),
                     "solution": world.hinted_trace(problem, privilege, rng, thinking=recipe.thinking,
                                                        solver=recipe.solver),
                     "answer": str(problem.answer)})
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def init_checkpoint(recipe: ModelRecipe, tokenizer_dir: str, path: str) -> None:
    """A randomly initialised Qwen3-architecture model (transformers' own init) with the world's
    tokenizer beside it."""
    import shutil

    import torch
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=MODEL_VOCAB, hidden_size=recipe.hidden, intermediate_size=3 * recipe.hidden,
        num_hidden_layers=recipe.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=recipe.hidden // 4,
        max_position_embeddings=256, rope_theta=10_000.0, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(recipe.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path)


def sft_config(recipe: ModelRecipe, data_path: str, init_dir: str, run_dir: str, steps: int):
    from opsd_jax.config import config_from_dict

    return config_from_dict({
        "model": {"checkpoint": init_dir, "compute_dtype": "float32", "remat": False},
        "teacher": {"kind": "live"},
        "data": {"path": data_path, "max_prompt_tokens": MAX_PROMPT_TOKENS, "shuffle_seed": recipe.seed},
        "prompt": {"privilege": "none", "student_suffix": "", "student_thinking": recipe.thinking,
                   "teacher_thinking": recipe.thinking},
        "sampling": {"max_new_tokens": MAX_RESPONSE_TOKENS},
        "objective": {"kind": "sft", "skip_first": 0, "importance_cap": None},
        "optimizer": {"learning_rate": 3e-3, "warmup_ratio": 0.05, "weight_decay": 0.01},
        "train": {"output_dir": run_dir, "steps": steps, "batch_size": 64, "mesh": "1,-1,1", "seed": recipe.seed,
                  "checkpoint_every": steps, "keep_checkpoints": 1},
    })


def train_recipe(recipe: ModelRecipe, out: str, *, steps: int | None = None) -> dict:
    """Runs one warm start into `out`/<name>; returns its first losses and final metrics."""
    from opsd_jax.distill.trainer import Trainer, export_checkpoint

    scratch = os.path.join(out, "_work", recipe.name)
    os.makedirs(scratch, exist_ok=True)
    tokenizer_dir = os.path.join(out, "_work", "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        world.save_tokenizer(tokenizer_dir)
    exclude = {(p.numbers, p.target) for p in held_out_problems(EXPERIMENT_PROBLEMS, seed=0)}
    rng = np.random.default_rng(recipe.seed)
    data_path = os.path.join(scratch, "sft.jsonl")
    world.write_jsonl(data_path, sft_rows(recipe, exclude, rng))
    init_dir = os.path.join(scratch, "init")
    init_checkpoint(recipe, tokenizer_dir, init_dir)
    steps = steps or recipe.steps
    history = Trainer(sft_config(recipe, data_path, init_dir, os.path.join(scratch, "run"), steps)).run()
    destination = os.path.join(out, recipe.name)
    export_checkpoint(os.path.join(scratch, "run"), None, destination, model_checkpoint=init_dir)
    return {"first_losses": [h["loss"] for h in history[:3]], "final_loss": history[-1]["loss"], "steps": steps}


CHECK_STEPS = 3

# Held-out problems reserved for the experiment (its OPSD prompts and its evaluation suite).
EXPERIMENT_PROBLEMS = 320


def warm_start(out: str, names=None, steps: int | None = None, seed: int | None = None) -> dict:
    """Trains the recipes named (default all) into `out`, writing `out`/manifest.json. steps /
    seed: override every named recipe's step count / seed (its initialisation, its warm-start
    traces and their order: a fresh replicate of the recipe); the manifest records what ran."""
    import shutil

    manifest_path = os.path.join(out, MANIFEST)
    manifest = {}
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    for recipe in RECIPES:
        if names and recipe.name not in names:
            continue
        if seed is not None:
            recipe = dataclasses.replace(recipe, seed=seed)
        print(f"warm start: {recipe.name} ({recipe.hidden} wide, {recipe.layers} layers, {steps or recipe.steps} steps, "
              f"seed {recipe.seed})", flush=True)
        manifest[recipe.name] = {**dataclasses.asdict(recipe), **train_recipe(recipe, out, steps=steps)}
        # A short run with its own schedule: what a test regenerates to check that this recipe
        # (init, data, step) is reproducible without retraining the whole model.
        check = train_recipe(recipe, os.path.join(out, "_check"), steps=CHECK_STEPS)
        manifest[recipe.name]["check_losses"] = check["first_losses"]
        shutil.rmtree(os.path.join(out, "_check"), ignore_errors=True)
    shutil.rmtree(os.path.join(out, "_work"), ignore_errors=True)
    from opsd_jax.eval.generations import write_atomic

    write_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return manifest
