"""`opsd-jax plan`: topology names, model configs found offline, and AOT compiles of the real jobs
for TPU topologies (fresh processes: libtpu reads the accelerator type when it loads)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml

from opsd_jax.plan.programs import PlanInputError, model_config_source, packaged_model_names
from opsd_jax.plan.topology import TopologyError, parse_topology

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE_DATA = os.path.join(REPO, "opsd_jax", "data", "samples", "math_demo.jsonl")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu absent: install the [tpu] extra")


@pytest.mark.parametrize("name, chips, jax_name, accelerator, hosts", [
    ("v5e-4", 4, "v5e:2x2", "v5litepod-4", 1), ("v6e-16", 16, "v6e:4x4", "v6e-16", 4),
    ("v5p-8", 4, "v5p:2x2x1", "v5p-8", 1), ("v5p-64", 32, "v5p:2x4x4", "v5p-64", 8),
    ("V4-32", 16, "v4:2x2x4", "v4-32", 4),
])
def test_topology_names_as_users_type_them(name, chips, jax_name, accelerator, hosts):
    topology = parse_topology(name)
    assert (topology.chips, topology.jax_name, topology.accelerator_type, topology.hosts) == (
        chips, jax_name, accelerator, hosts)


DESCRIBE = """
import collections, os, sys
from opsd_jax.plan.topology import accelerator_environment, parse_topology, topology_devices
topology = parse_topology(sys.argv[1])
os.environ.update(accelerator_environment(topology))
devices = topology_devices(topology)
print(len({tuple(d.coords) for d in devices}), sorted(collections.Counter(d.process_index for d in devices).values()))
"""


@needs_libtpu
@pytest.mark.parametrize("name, chips_per_host", [("v4-32", [4, 4, 4, 4]), ("v5e-1", [1]), ("v5e-8", [4, 4]),
                                                  ("v5p-16", [4, 4])])
def test_libtpu_describes_a_chip_as_one_device_on_four_chip_hosts(name, chips_per_host):
    """As jobs run them: v4 and v5p chips as one megacore device each (libtpu's default gives a v4
    chip two devices, which failed every v4 plan), four chips per host from 4 chips up."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run([sys.executable, "-c", DESCRIBE, name], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    topology = parse_topology(name)
    assert done.stdout.split("\n")[-2] == f"{topology.chips} {chips_per_host}"
    assert len(chips_per_host) == topology.hosts


@pytest.mark.parametrize("name", ["v5p-7", "v5e-3", "v7-8", "tpu", "v5p-64x"])
def test_unknown_topology_lists_the_valid_ones(name):
    with pytest.raises(TopologyError, match=r"unknown TPU topology .*valid: v4-8, .*v5e-4, .*v5p-64"):
        parse_topology(name)


def test_model_configs_are_found_offline(tmp_path):
    assert set(packaged_model_names()) >= {"qwen3-1.7b", "qwen3-8b", "olmo-3-7b-think"}
    assert model_config_source("checkpoints/Qwen3-8B").endswith(os.path.join("model_configs", "qwen3-8b"))
    (tmp_path / "only-config").mkdir()
    (tmp_path / "only-config" / "config.json").write_text("{}")
    assert model_config_source(str(tmp_path / "only-config")) == str(tmp_path / "only-config")
    with pytest.raises(PlanInputError, match=r"nope/config.json not found, and no packaged config is named 'nope'"):
        model_config_source(str(tmp_path / "nope"))


def _plan(tmp_path, config: dict, *args):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run(
        [sys.executable, "-m", "opsd_jax.cli", "plan", "--config", "run.yaml", "--json", "plan.json", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def _tiny_model(folder, **overrides):
    folder.mkdir()
    fields = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=1024, hidden_size=128,
                  intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
    fields.update(overrides)
    (folder / "config.json").write_text(json.dumps(fields))
    return str(folder)


def _run_config(model, **train):
    return {"model": {"checkpoint": model, "compute_dtype": "bfloat16", "remat": True},
            "data": {"max_prompt_tokens": 96},
            "sampling": {"max_new_tokens": 32, "max_slots": 4},
            "train": {"batch_size": 8, "microbatches": 2, "mesh": "1,-1,1", **train},
            "eval": {"max_tokens": 256}}


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e-4", "v5p-8"])
def test_tiny_plan_compiles_the_real_jobs_for_a_multi_chip_topology(tmp_path, topology):
    model = _tiny_model(tmp_path / "tiny")
    done = _plan(tmp_path, _run_config(model), "--topology", topology, "--eval-slots", "2")
    report = json.loads((tmp_path / "plan.json").read_text())
    rows = {r["name"]: r for r in report["programs"]}
    assert report["chips"] == 4 and report["model_configs"]["student"] == model
    # The rollout sampler: decode (with and without alternatives) plus one chunk program per prefill
    # bucket a 96-token prompt reaches (64, 128), on the sampler's own mesh: tensor parallel over
    # the model's 2 KV heads, slots over data.
    assert {"rollout_decode", "rollout_decode_top_logprobs", "rollout_prefill_64", "rollout_prefill_128",
            "eval_decode", "eval_prefill_64"} <= set(rows)
    for name in ("rollout_decode", "eval_decode"):
        assert rows[name]["verdict"] == "fits" and rows[name]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
        assert 0 < rows[name]["total_bytes"] < 2**30 and rows[name]["flops"] > 0
    # `opsd-jax analyze`'s scoring step on the host's chips, rollouts of the evaluation's cap
    # (256 -> padded 256) and of training's (32), self-distillation: one copy of the weights.
    for name, completion in (("analyze_eval_rollouts", 256), ("analyze_train_rollouts", 32)):
        assert rows[name]["verdict"] == "fits" and rows[name]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
        assert f"4 rollouts of {completion} tokens" in rows[name]["description"]
        assert "the student as its own teacher" in rows[name]["description"] and rows[name]["flops"] > 0
    assert "opsd-jax analyze --mesh 1,-1,1 --dtype bfloat16 --batch-size 4" in done.stdout, done.stdout
    train = rows["train_step"]
    assert train["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    # The trainer's own jit with the kernel "auto" resolves to on TPU (xla; pallas_tpu's step is
    # tests/kernels/test_pallas_tpu_aot.py's), the kernel in its vocabulary-parallel shard_map.
    assert "via xla" in train["description"], train["description"]
    assert train["verdict"] == "fits" and train["resident_bytes"] > 0 and done.returncode == 0, done.stdout
    # The time floor is the counted matmuls at the generation's bf16 peak.
    peak = {"v5e-4": 197e12, "v5p-8": 459e12}[topology]
    assert report["peak_bf16_flops_per_chip"] == peak
    assert train["peak_seconds"] == pytest.approx(train["flops"] / peak)
    assert f"train_step {train['peak_seconds']:.3g} s" in done.stdout, done.stdout


@needs_libtpu
def test_samplers_compile_on_one_host_of_a_v5e_16(tmp_path):
    """A v5e-16 host holds chips 0, 1, 4 and 5 of the 4x4 grid, and libtpu refused every program
    on them ("Unexpected device_id 4") where a collective spans the four (tensor parallelism over 4
    KV heads): the host is compiled as a 2x2 slice of its own."""
    model = _tiny_model(tmp_path / "tiny", num_key_value_heads=4)
    done = _plan(tmp_path, _run_config(model), "--topology", "v5e-16", "--programs", "rollout,eval",
                 "--eval-slots", "2")
    rows = {r["name"]: r for r in json.loads((tmp_path / "plan.json").read_text())["programs"]}
    for name in ("rollout_decode", "rollout_prefill_64", "eval_decode"):
        assert rows[name]["verdict"] == "fits", (name, rows[name]["error"])
        assert rows[name]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4}
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


@needs_libtpu
def test_the_configs_kernel_reaches_the_train_step(tmp_path):
    """train.kernel: xla plans the trainer's step with the XLA kernel's one sweep on a mesh that
    splits the vocabulary over tensor (a shard_map XLA partitions with no Mosaic call in it)."""
    model = _tiny_model(tmp_path / "tiny")
    done = _plan(tmp_path, _run_config(model, mesh="1,2,2", kernel="xla"), "--topology", "v5e-4", "--programs", "train")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    train = {r["name"]: r for r in json.loads((tmp_path / "plan.json").read_text())["programs"]}["train_step"]
    assert train["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2} and train["verdict"] == "fits"
    assert "via xla" in train["description"], train["description"]


@needs_libtpu
def test_a_model_too_large_is_exit_2_naming_the_largest_array(tmp_path):
    """A 4-layer model whose evaluation KV cache (64 slots x 131k tokens) is 32 GiB per v5e chip."""
    model = _tiny_model(tmp_path / "wide", num_hidden_layers=4, hidden_size=1024, num_attention_heads=8,
                        num_key_value_heads=8,
                        head_dim=128, max_position_embeddings=140000)
    config = _run_config(model)
    config["eval"]["max_tokens"] = 130000
    done = _plan(tmp_path, config, "--topology", "v5e-4", "--programs", "eval", "--eval-slots", "64")
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    # The TPU compiler itself refuses for HBM; the plan reports what it asked for and the largest arrays.
    assert "eval_decode does not fit: the compiler needs" in done.stdout
    # One layer's K (or V) page pool: 64 x 8,189 pages of 16 rows (every slot at full length), 64
    # for one held 1,024-token prompt, and the null page.
    assert "Largest arrays: bf16[524161,16,8,128] (16.00 GiB" in done.stdout
    assert "try fewer slots" in done.stdout


@needs_libtpu
def test_the_datas_longest_prompts_size_the_train_step_and_the_rollout_sampler(tmp_path):
    """--prompt-tokens 40,90 plans what the trainer runs on data whose longest prompts have 40
    (student) and 90 (teacher) tokens: contexts of 40 + 32 = 72 and 90 + 32 = 122 -> 128 tokens
    (multiples of twice the 4 chips), and a rollout sampler for 72-token sequences (one prefill
    bucket, 64), not both at data.max_prompt_tokens = 96."""
    model = _tiny_model(tmp_path / "tiny")
    done = _plan(tmp_path, _run_config(model), "--topology", "v5e-4", "--programs", "train,rollout",
                 "--prompt-tokens", "40,90")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["prompt_tokens"] == {"student": 40, "teacher": 90, "source": "from --prompt-tokens"}
    assert "longest prompts: student 40, teacher 90 tokens (from --prompt-tokens)" in done.stdout
    rows = {r["name"]: r for r in report["programs"]}
    assert "student / teacher contexts 72 / 128 tokens" in rows["train_step"]["description"]
    assert "rollout_prefill_64" in rows and "rollout_prefill_128" not in rows, sorted(rows)
    # Prompts over data.max_prompt_tokens are cut to it, as the trainer cuts them.
    done = _plan(tmp_path, _run_config(model), "--topology", "v5e-4", "--programs", "train",
                 "--prompt-tokens", "20,500")
    train = {r["name"]: r for r in json.loads((tmp_path / "plan.json").read_text())["programs"]}["train_step"]
    assert "student / teacher contexts 56 / 128 tokens" in train["description"], train["description"]
    # Where this host has the data and the checkpoint's tokenizer, the plan measures them itself.
    from opsd_jax.testing import save_tiny_tokenizer

    save_tiny_tokenizer(model)
    config = _run_config(model)
    config["data"].update(path=SAMPLE_DATA, max_prompt_tokens=192)
    config["prompt"] = {"privilege": "dense"}
    done = _plan(tmp_path, config, "--topology", "v5e-4", "--programs", "train")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    prompts = json.loads((tmp_path / "plan.json").read_text())["prompt_tokens"]
    assert prompts["source"] == f"measured from {SAMPLE_DATA}" and 0 < prompts["student"] < prompts["teacher"] < 192
    assert f"longest prompts: student {prompts['student']}, teacher {prompts['teacher']} tokens (measured" in done.stdout


@needs_libtpu
def test_bad_input_is_exit_1_with_a_clear_error(tmp_path):
    done = _plan(tmp_path, _run_config(str(tmp_path / "missing")), "--topology", "v5e-4")
    assert done.returncode == 1 and "missing/config.json not found" in done.stderr
    model = _tiny_model(tmp_path / "tiny")
    done = _plan(tmp_path, _run_config(model), "--topology", "v5e-3")
    assert done.returncode == 1 and "unknown TPU topology 'v5e-3'" in done.stderr
    done = _plan(tmp_path, _run_config(model, mesh="2,2,2"), "--topology", "v5e-4")
    assert done.returncode == 1 and "train.mesh: mesh" in done.stderr and "needs 8 devices" in done.stderr
    done = _plan(tmp_path, _run_config(model), "--topology", "v5e-4", "--prompt-tokens", "40")
    assert done.returncode == 1 and "--prompt-tokens: expected STUDENT,TEACHER" in done.stderr, done.stderr


@needs_libtpu
def test_analyze_scores_qwen3_8b_evaluation_rollouts_on_one_v5e_host(tmp_path):
    """`opsd-jax analyze` at the paper's evaluation cap (38,912 tokens) with Qwen3-8B as its own
    privileged teacher, on the 4 chips of one v5e host (16 GiB each): it fits once rollouts pad to
    40,960 and not 65,536 inside 131,072-token contexts (BUILD_NOTES, "analyze at the paper's sizes")."""
    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "qwen3_8b_ot15k_dense.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run([sys.executable, "-m", "opsd_jax.cli", "plan", "--config", os.path.abspath(config),
                           "--topology", "v5e-8", "--programs", "analyze", "--json", "plan.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "plan.json").read_text())["programs"]}
    scoring = rows["analyze_eval_rollouts"]
    assert scoring["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and scoring["verdict"] == "fits"
    assert "4 rollouts of 38912 tokens (padded to 40960), student context 40960, teacher contexts 49152" in \
        scoring["description"]
    # One bfloat16 copy of the 8B weights over 4 chips (about 3.8 GiB each), not two.
    assert scoring["argument_bytes"] < 4.5 * 2**30 and scoring["total_bytes"] < 16 * 2**30
    assert rows["analyze_train_rollouts"]["verdict"] == "fits"
