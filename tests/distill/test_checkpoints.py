"""Resume modes (auto / always / never) against checkpoints written by the trainer's own save path,
and `opsd-jax train --resume` parsing."""

import subprocess
import sys

import jax.numpy as jnp
import pytest

from opsd_jax.cli import _resume_mode, parse_arguments
from opsd_jax.config import load_config
from opsd_jax.distill.checkpoints import (
    ResumeError,
    checkpoint_manager,
    config_differences,
    resume_decision,
    save_checkpoint,
)


def _saved_run(tmp_path, config, steps=(2,)):
    manager = checkpoint_manager(str(tmp_path / "run" / "checkpoints"), keep=3, every=100)
    for step in steps:
        save_checkpoint(manager, step, {"w": jnp.arange(4.0) * step}, {"position": step}, config.to_dict(), force=True)
    manager.wait_until_finished()
    return manager


def test_auto_resumes_the_same_config_and_names_the_keys_of_a_different_one(tmp_path):
    base = ["train.steps=10", f"train.output_dir={tmp_path / 'run'}"]
    config = load_config(None, base)
    manager = _saved_run(tmp_path, config, steps=(2, 4))
    out = str(tmp_path / "run")
    assert resume_decision("auto", manager, config, out) == (4, [])
    # Where and how often things are written, and the eval section, may change between launches.
    free = load_config(None, base + ["train.checkpoint_every=7", "train.log_every=3", "eval.n=4",
                                     "train.preemption_exit_code=43", "train.keep_checkpoints=9"])
    assert resume_decision("auto", manager, free, out) == (4, [])
    changed = load_config(None, base + ["optimizer.learning_rate=1e-4", "objective.beta=0.25"])
    with pytest.raises(ResumeError, match=r"different config \(objective.beta: saved 0.5, now 0.25; "
                                          r"optimizer.learning_rate: saved 5e-06, now 0.0001\); pass --resume always"):
        resume_decision("auto", manager, changed, out)
    assert resume_decision("always", manager, changed, out) == (
        4, [("objective.beta", 0.5, 0.25), ("optimizer.learning_rate", 5e-06, 0.0001)])
    with pytest.raises(ResumeError, match="already holds checkpoints \\(latest step 4\\)"):
        resume_decision("never", manager, config, out)
    with pytest.raises(ResumeError, match="'sometimes' is not one of auto, always, never"):
        resume_decision("sometimes", manager, config, out)
    manager.close()


def test_an_empty_run_directory_starts_fresh_in_every_mode(tmp_path):
    config = load_config(None, [f"train.output_dir={tmp_path / 'run'}"])
    manager = checkpoint_manager(str(tmp_path / "run" / "checkpoints"), keep=3, every=100)
    for mode in ("auto", "always", "never"):
        assert resume_decision(mode, manager, config, str(tmp_path / "run")) == (None, [])
    manager.close()


def test_a_key_missing_from_an_older_config_differs_only_when_not_default():
    config = load_config(None, []).to_dict()
    older = {section: dict(values) for section, values in config.items()}
    del older["train"]["preemption_exit_code"], older["objective"]["discount"]
    assert config_differences(older, config) == []
    config["objective"]["discount"] = 0.9
    assert config_differences(older, config) == [("objective.discount", None, 0.9)]


@pytest.mark.parametrize("argv, mode, overrides", [
    (["train", "--config", "c.yaml"], "auto", []),
    (["train", "--config", "c.yaml", "--resume"], "always", []),
    (["train", "--config", "c.yaml", "--resume", "never", "train.steps=3"], "never", ["train.steps=3"]),
    (["train", "--config", "c.yaml", "--resume=auto"], "auto", []),
    # The flag's old spelling: an override right after a bare --resume stays an override.
    (["train", "--config", "c.yaml", "--resume", "train.steps=3", "a.b=1"], "always", ["train.steps=3", "a.b=1"]),
])
def test_resume_flag(argv, mode, overrides):
    args = parse_arguments(argv)
    _resume_mode(args)
    assert (args.resume, args.overrides) == (mode, overrides)


def test_resume_flag_rejects_an_unknown_mode():
    args = parse_arguments(["train", "--config", "c.yaml", "--resume", "sometimes"])
    with pytest.raises(ValueError, match="--resume: 'sometimes' is not one of auto, always, never"):
        _resume_mode(args)


def test_reading_the_resume_flag_does_not_import_jax():
    """`opsd-jax train` sets up the config's CPU devices after reading the flags, before jax starts."""
    code = ("import sys; from opsd_jax.cli import _resume_mode, parse_arguments; "
            "args = parse_arguments(['train', '--config', 'c.yaml', '--resume', 'train.steps=3']); _resume_mode(args); "
            "print(args.resume, 'jax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.stdout.split() == ["always", "False"], done.stderr[-2000:]
