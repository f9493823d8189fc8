"""Run configs: YAML, dotted overrides, and errors that name the key."""

import os

import pytest

from opsd_jax.config import ConfigKeyError, load_config


def test_yaml_and_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("optimizer:\n  learning_rate: 5e-6\nobjective:\n  kind: reverse_kl\n")
    config = load_config(str(tmp_path / "run.yaml"), ["train.steps=7", "prompt.privilege=sparse", "objective.window=16"])
    assert config.optimizer.learning_rate == 5e-6 and config.objective.kind == "reverse_kl"
    assert config.train.steps == 7 and config.prompt.privilege == "sparse" and config.objective.window == 16


@pytest.mark.parametrize(
    "override, message",
    [("optimizer.learnig_rate=1", r"unknown config key optimizer.learnig_rate; valid keys in section 'optimizer': b1, b2, learning_rate"),
     ("trian.steps=3", r"unknown config key trian; valid keys in the top level: data, eval, model"),
     ("objective.kind=kl", r"objective.kind: 'kl' is not one of 'jsd', 'forward_kl'"),
     ("train.steps=many", r"train.steps: expected an integer"),
     ("model.remat=maybe", r"model.remat: expected true or false"),
     ("train.kernel=triton", r"train.kernel: 'triton' is not one of 'auto', 'xla', 'pallas_tpu'"),
     ("steps", r"must look like section.key=value"),
     ("=5", r"override '=5' must look like section.key=value"),
     ("train.=5", r"must look like section.key=value"),
     ("train.steps=0", r"train.steps: must be >= 1, got 0"),
     ("train.microbatches=0", r"train.microbatches: must be >= 1"),
     ("train.log_every=0", r"train.log_every: must be >= 1"),
     ("train.batch_size=0", r"train.batch_size: must be >= 1"),
     ("objective.beta=1.5", r"objective.beta: must be in \[0, 1\], got 1.5"),
     ("sampling.top_p=0", r"sampling.top_p: must be in \(0, 1\]"),
     ("sampling.max_new_tokens=0", r"sampling.max_new_tokens: must be >= 1"),
     ("optimizer.learning_rate=.nan", r"optimizer.learning_rate: must be >= 0, got nan"),
     ("eval.top_k=-1", r"eval.top_k: must be >= 0")],
)
def test_bad_keys_are_named(override, message):
    with pytest.raises(ConfigKeyError, match=message):
        load_config(None, [override])


def test_ranges_admit_their_edges_and_unset_values():
    config = load_config(None, ["objective.beta=0", "objective.window=null", "sampling.temperature=0",
                                "sampling.top_p=1", "train.save_rollouts_every=0", "optimizer.warmup_ratio=1"])
    assert (config.objective.beta, config.objective.window, config.sampling.top_p) == (0.0, None, 1.0)


def test_a_list_config_with_overrides_is_named(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigKeyError, match="list.yaml: expected a mapping of sections, got list"):
        load_config(str(tmp_path / "list.yaml"), ["train.steps=1"])


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml")))
def test_shipped_configs_load(name):
    config = load_config(os.path.join(CONFIGS, name))
    assert config.train.steps >= 1 and config.model.checkpoint


def test_path_keys_resolve_against_the_current_directory(tmp_path, monkeypatch):
    from opsd_jax.config import PATH_KEYS, RunConfig, resolve_paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/someone")
    (tmp_path / "run.yaml").write_text("model:\n  checkpoint: ckpt/student\ndata:\n  path: ~/data/train.jsonl\n")
    config = load_config("run.yaml", ["train.output_dir=runs/x", "teacher.checkpoint=../teacher"])
    assert config.model.checkpoint == str(tmp_path / "ckpt" / "student")
    assert config.data.path == "/home/someone/data/train.jsonl"
    assert config.train.output_dir == str(tmp_path / "runs" / "x")
    assert config.teacher.checkpoint == str(tmp_path.parent / "teacher")
    assert set(PATH_KEYS) == {"model.checkpoint", "teacher.checkpoint", "data.path", "train.output_dir"}
    unset = resolve_paths(RunConfig())
    assert unset.model.checkpoint == "" and unset.teacher.checkpoint is None and unset.data.path == ""
    assert resolve_paths(config) == config


def test_model_attention_settings_reach_the_model_config():
    from opsd_jax.models import ModelConfig
    from opsd_jax.plan.programs import run_model_configs

    config = load_config(None, ["model.attention=dense", "model.attention_block_size=128", "model.remat=false",
                                "model.remat_policy=dots", "model.checkpoint=checkpoints/Qwen3-1.7B"])
    assert config.model.runtime(training=True) == {"compute_dtype": "bfloat16", "attention_implementation": "dense",
                                                   "attention_block_size": 128, "scan_layers": True, "remat": False,
                                                   "remat_policy": "dots"}
    assert "remat" not in config.model.runtime(training=False)
    student, _, _ = run_model_configs(config)
    assert isinstance(student, ModelConfig)
    assert (student.attention_implementation, student.attention_block_size, student.remat,
            student.remat_policy) == ("dense", 128, False, "dots")
    with pytest.raises(ConfigKeyError, match="model.remat_policy: 'nothing' is not one of"):
        load_config(None, ["model.remat_policy=nothing"])
    with pytest.raises(ConfigKeyError, match="model.attention: 'flash' is not one of"):
        load_config(None, ["model.attention=flash"])


@pytest.mark.parametrize("kind, param, compute, kept", [
    ("frozen", "float32", "bfloat16", "bfloat16"),
    ("external", "float32", "bfloat16", "bfloat16"),
    ("frozen", "float32", "float32", "float32"),
    ("frozen", "bfloat16", "float32", "bfloat16"),  # never wider than the student's own copy
    ("ema", "float32", "bfloat16", "float32"),  # its updates are below bfloat16's rounding
])
def test_teacher_parameter_dtype(kind, param, compute, kept):
    c = load_config(None, [f"teacher.kind={kind}", f"model.param_dtype={param}", f"model.compute_dtype={compute}"])
    assert c.teacher.param_dtype(c.model) == kept
