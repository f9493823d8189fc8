import json
import os

import numpy as np
import pytest

from opsd_jax.toyworld import warmstart


def _read(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _manifest() -> dict:
    return json.loads(_read(os.path.join(warmstart.SHIPPED, warmstart.MANIFEST)))


def test_shipped_checkpoints_are_complete_hf_folders():
    import transformers

    manifest = _manifest()
    assert set(manifest) == {r.name for r in warmstart.RECIPES}
    for recipe in warmstart.RECIPES:
        folder = os.path.join(warmstart.SHIPPED, recipe.name)
        config = json.loads(_read(os.path.join(folder, "config.json")))
        assert (config["hidden_size"], config["num_hidden_layers"]) == (recipe.hidden, recipe.layers)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        assert len(tokenizer) <= config["vocab_size"] == warmstart.MODEL_VOCAB
        assert manifest[recipe.name]["final_loss"] < 0.5 * manifest[recipe.name]["first_losses"][0]


@pytest.mark.parametrize("name", ["thinker", "teacher"])
def test_regenerating_a_warm_start_reproduces_the_recorded_losses(tmp_path, name):
    """`opsd-jax toyworld warmstart` is reproducible: the same init, data and sft steps give the
    losses recorded in the shipped manifest (a short run with its own schedule, to stay fast)."""
    manifest = _manifest()
    recipe = next(r for r in warmstart.RECIPES if r.name == name)
    record = warmstart.train_recipe(recipe, str(tmp_path), steps=warmstart.CHECK_STEPS)
    np.testing.assert_allclose(record["first_losses"], manifest[name]["check_losses"], rtol=2e-4)


def test_shipped_thinker_converts_both_ways_bit_exactly(tmp_path):
    """The toy checkpoints are ordinary HF folders: HF -> Orbax -> HF is bit-exact, tokenizer included."""
    from safetensors.numpy import load_file

    from opsd_jax.checkpoint.hf import load_hf, save_hf
    from opsd_jax.checkpoint.orbax import restore_params, save_params

    source = os.path.join(warmstart.SHIPPED, "thinker")
    config, params = load_hf(source, progress=False)
    save_params(params, config, str(tmp_path / "orbax"))
    restored_config, restored = restore_params(str(tmp_path / "orbax"))
    save_hf(restored, restored_config, str(tmp_path / "hf"), side_files_from=source, progress=False)
    original, exported = (load_file(os.path.join(d, "model.safetensors")) for d in (source, str(tmp_path / "hf")))
    assert original.keys() == exported.keys()
    assert all(original[k].tobytes() == exported[k].tobytes() for k in original)
    assert _read(os.path.join(source, "tokenizer.json")) == _read(tmp_path / "hf" / "tokenizer.json")


def test_a_seed_override_makes_a_fresh_replicate_and_is_recorded(tmp_path, monkeypatch):
    """`opsd-jax toyworld warmstart DIR --models teacher --steps N --seed S` trains the recipe with
    seed S (initialisation, traces, order) in the run and in its reproducibility check, and the
    manifest records the seed and steps that ran, not the recipe's defaults."""
    from opsd_jax.cli import parse_arguments

    args = parse_arguments(["toyworld", "warmstart", str(tmp_path / "out"), "--models", "teacher", "--steps", "7",
                            "--seed", "4"])
    assert (args.models, args.steps, args.seed) == ("teacher", 7, 4)
    seen = []

    def fake_train(recipe, out, *, steps=None):
        seen.append((recipe.name, recipe.seed, steps))
        return {"first_losses": [3.0, 2.9, 2.8], "final_loss": 0.1, "steps": steps or recipe.steps}

    monkeypatch.setattr(warmstart, "train_recipe", fake_train)
    manifest = warmstart.warm_start(str(tmp_path / "out"), names=["teacher"], steps=7, seed=4)
    assert seen == [("teacher", 4, 7), ("teacher", 4, warmstart.CHECK_STEPS)]
    assert set(manifest) == {"teacher"}
    assert (manifest["teacher"]["seed"], manifest["teacher"]["steps"]) == (4, 7)
    on_disk = json.loads(_read(tmp_path / "out" / warmstart.MANIFEST))
    assert on_disk["teacher"]["seed"] == 4
    shipped = next(r for r in warmstart.RECIPES if r.name == "teacher")
    assert shipped.seed != 4  # the shipped recipe itself is untouched
