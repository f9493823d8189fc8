"""The train step's FLOP count against a hand count, and the utilization the trainer logs."""

import json
import types

import jax
import pytest

from opsd_jax.config import config_from_dict
from opsd_jax.distill.trainer import train_context_lengths
from opsd_jax.distill.utilization import StepFlops, peak_flops, step_flops, utilization_metrics
from opsd_jax.models import ModelConfig
from opsd_jax.parallel import make_mesh
from opsd_jax.plan.programs import train_step_inputs

# Untied head, grouped-query attention, two layers (one scan over them).
CONFIG = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=512, hidden_size=32,
              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
              torch_dtype="float32")


def _compiled_step(tmp_path, microbatches):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    c = config_from_dict({
        "model": {"checkpoint": str(tmp_path), "compute_dtype": "float32", "remat": False, "attention": "dense"},
        "data": {"max_prompt_tokens": 20}, "sampling": {"max_new_tokens": 16},
        "train": {"batch_size": 8, "microbatches": microbatches}})
    model = ModelConfig.from_hf(str(tmp_path), param_dtype="float32").replace(**c.model.runtime(training=True))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    step, state, batch, _ = train_step_inputs(c, model, None, mesh, 1, kernel_impl="xla")
    return c, step.lower(state, batch).compile()


@pytest.mark.parametrize("microbatches", [1, 2])
def test_the_counted_step_is_the_hand_count(tmp_path, microbatches):
    """One device, dense attention, no remat: every matmul of the step by hand. A forward costs
    2 x tokens x the layers' projection weights plus 4 x heads x L^2 x head_dim of attention per
    sequence and layer; the student's backward twice its forward; the frozen teacher one forward;
    the xla kernel its 8 N H V sweep, the 2 N H V student pass the importance weights need, and
    its backward's remainder sweep (bounded at run time; it never runs in training) counted once:
    one 128-row token block, here all N = 128 rows. Both layers and both microbatches must count."""
    c, compiled = _compiled_step(tmp_path, microbatches)
    counted = step_flops(compiled, jax.devices()[0])
    B, T = c.train.batch_size, c.sampling.max_new_tokens
    student, teacher = train_context_lengths(c, 1, None)
    D, F, heads, kv_heads, head_dim, V = 32, 64, 4, 2, 8, 512
    projection_weights = D * heads * head_dim * 2 + 2 * D * kv_heads * head_dim + 3 * D * F

    def forward(length):
        return CONFIG["num_hidden_layers"] * B * (2 * length * projection_weights + 4 * heads * length ** 2 * head_dim)

    N = B * T
    assert N == 128
    expected = 3 * forward(student) + forward(teacher) + (8 + 2 + 8) * N * D * V
    assert counted.per_chip == pytest.approx(expected, rel=1e-9)
    assert counted.peak_per_chip is None and counted.platform == "cpu"
    assert len(counted.runtime_loops) == 1 and "fused_linear_divergence" in counted.runtime_loops[0]
    assert "TFLOP of matmuls per chip" in counted.describe()


def test_a_tpu_gets_its_peak_and_a_gpu_no_count(tmp_path):
    _, compiled = _compiled_step(tmp_path, 1)
    cpu = step_flops(compiled, jax.devices()[0])
    tpu = step_flops(compiled, types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite"))
    assert tpu.per_chip == cpu.per_chip and tpu.peak_per_chip == 197e12
    assert "peak 197 TFLOP/s" in tpu.describe()
    gpu = step_flops(compiled, types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200"))
    assert gpu.per_chip is None and "not counted on gpu" in gpu.describe()
    assert utilization_metrics(gpu, 1.0) == {}


@pytest.mark.parametrize("kind,peak", [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12),
                                       ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("cpu", None),
                                       ("NVIDIA H200", None)])
def test_peak_of_each_device_kind(kind, peak):
    assert peak_flops(kind) == peak


def test_utilization_metrics():
    flops = StepFlops(per_chip=3e12, peak_per_chip=200e12, platform="tpu")
    assert utilization_metrics(flops, 2.0) == {"update_tflops_per_chip": 1.5, "update_peak_fraction": 0.0075}
    assert utilization_metrics(StepFlops(3e12, None, "cpu"), 2.0) == {"update_tflops_per_chip": 1.5}
    assert utilization_metrics(flops, 0.0) == {}
