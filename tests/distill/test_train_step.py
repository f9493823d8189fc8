"""The train step's loss through the fused kernel's training path: the loss's own per-token weights
(sequence mean x importance scale x token weighting) go into the kernel, whose forward then forms
the final gradients. Loss and gradients against plain autodiff of the reference kernel."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax.config import ObjectiveSection
from opsd_jax.distill import objectives
from opsd_jax.distill.train_step import (
    Batch,
    StepSettings,
    accumulated_gradients,
    loss_and_metrics,
    train_step,
)
from opsd_jax.models import ModelConfig, forward_hidden, init_params
from opsd_jax.parallel import make_mesh
from tests.kernels.sweeps import record_sweep_remainders

CONFIG = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=512, hidden_size=32, intermediate_size=64,
    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32")


@pytest.fixture(scope="module")
def model():
    return ModelConfig.from_hf(CONFIG)


def _batch(rng, B=4, L=14, T=8):
    tokens = jnp.asarray(rng.integers(3, 500, (B, L)), jnp.int32)
    index = jnp.broadcast_to(jnp.arange(L - T - 1, L - 1, dtype=jnp.int32), (B, T))
    lengths = jnp.asarray(rng.integers(2, T + 1, B), jnp.int32)
    # Sampler log-probs near the student's (about -6.2 for a fresh 512-token model): ratios around
    # 1, some above the paper's cap of 2, so every sequence gets its own importance scale.
    sampler = jnp.asarray(-6.2 + rng.normal(size=(B, T)) * 0.8, jnp.float32)
    return Batch(tokens, jnp.ones((B, L), jnp.int32), tokens, jnp.ones((B, L), jnp.int32), index, index,
                 tokens[:, L - T:], lengths, sampler)


def _params(model, rng):
    key = jax.random.key(int(rng.integers(2**31)))
    return tuple(init_params(model, k) for k in jax.random.split(key))


def _threshold_is_clear(model, params, batch, objective, gap=5e-6):
    """Whether the student entropies next to the top-rho quantile differ by more than `gap` (a
    fresh model's entropies all lie within ~2e-3 of log 500, about 7e-5 apart; the two kernels'
    float32 entropies differ by ~1e-6)."""
    hidden, head = forward_hidden(params, model, batch.student_tokens, attention_mask=batch.student_mask)
    logits = jnp.take_along_axis(hidden, batch.student_index[..., None], axis=1) @ head
    logp = jax.nn.log_softmax(logits[..., :500].astype(jnp.float64 if jax.config.x64_enabled else jnp.float32))
    entropy = -(jnp.exp(logp) * logp).sum(-1)
    mask = objectives.completion_mask(batch.lengths, batch.targets.shape[1], skip_first=objective.skip_first)
    values = np.sort(np.asarray(entropy)[np.asarray(mask)])
    position = (1.0 - objective.top_rho) * (len(values) - 1)
    near = values[max(int(np.floor(position)) - 1, 0):int(np.ceil(position)) + 2]
    return len(near) < 2 or np.diff(near).min() > gap


def _loss_and_grads(params, teacher, batch, settings):
    fn = jax.value_and_grad(lambda p: loss_and_metrics(p, teacher, batch, settings), has_aux=True)
    (loss, metrics), grads = jax.jit(fn)(params)
    return float(loss), metrics, grads


@pytest.mark.parametrize("objective", [
    ObjectiveSection(kind="jsd", beta=0.5, skip_first=1, token_weighting="downweight_teacher_at_forks"),
    ObjectiveSection(kind="reverse_kl", skip_first=0, importance="sequence", reduction="token_mean",
                     token_weighting="top_student_entropy", top_rho=0.5),
])
def test_weighted_loss_and_gradients_match_autodiff_and_need_one_sweep(model, rng, objective, monkeypatch):
    """xla (student statistics first, then the fused sweep with the loss's final weights) against
    the reference kernel (whole logits, autodiff): same loss, same gradients; and the backward
    takes every divergence cotangent from the forward (no token left for a second sweep)."""
    remainders = record_sweep_remainders(monkeypatch)
    params, teacher = _params(model, rng)
    batch = _batch(rng)
    # The top-entropy weighting is a step function of the entropies: two of them within float32
    # noise of each other around its threshold can rank differently in the two kernels.
    for _ in range(50):
        if objective.token_weighting != "top_student_entropy" or _threshold_is_clear(model, params, batch, objective):
            break
        params, teacher = _params(model, rng)
        batch = _batch(rng)
    else:
        raise AssertionError("no draw of 50 had its entropy threshold clear of float32 noise")
    results = {}
    for impl in ("xla", "reference"):
        settings = StepSettings(student=model, teacher=model, objective=objective, kernel_impl=impl, valid_vocab=500)
        results[impl] = _loss_and_grads(params, teacher, batch, settings)
    assert remainders == [0]
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = results["xla"], results["reference"]
    assert loss > 0 and loss == pytest.approx(ref_loss, rel=2e-5)
    scale = np.asarray(metrics["importance_ratio_max"])
    assert scale == pytest.approx(float(ref_metrics["importance_ratio_max"]), rel=1e-5)
    assert float(metrics["importance_ratio_mean"]) != pytest.approx(float(scale))  # sequences differ
    assert np.abs(np.asarray(grads["lm_head"])).max() > 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5 * np.abs(a).max(), err_msg=jax.tree_util.keystr(path))


def test_loss_weights_are_the_gradient_of_the_reduction(rng):
    B, T = 5, 9
    mask = jnp.asarray(rng.random((B, T)) > 0.3).at[0].set(False)  # a sequence without loss tokens
    token_w = jnp.asarray(rng.uniform(0.2, 1.0, (B, T)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, B), jnp.float32)
    per_token = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    for reduction in ("sequence_mean", "token_mean"):
        w = objectives.loss_weights(token_w, mask, scale, reduction)
        loss = objectives.reduce_loss(per_token, token_w, mask, scale, reduction)
        # float32 sums of terms of either sign: the error scales with the terms, not with the
        # total, which can cancel to near zero on some draws
        terms = float(jnp.sum(jnp.abs(w * per_token)))
        assert float(jnp.sum(w * per_token)) == pytest.approx(float(loss), rel=1e-5, abs=1e-6 * terms)
        assert np.all(np.asarray(w)[~np.asarray(mask)] == 0.0)
    counts = np.asarray(mask).sum(1)
    expected = np.where(np.asarray(mask), np.asarray(token_w) * np.asarray(scale)[:, None]
                        / np.maximum(counts, 1)[:, None] / B, 0.0)  # the empty sequence still counts
    np.testing.assert_allclose(np.asarray(objectives.loss_weights(token_w, mask, scale, "sequence_mean")), expected,
                               rtol=1e-6)


def test_token_parallel_mesh_keeps_the_single_sweep_and_the_gradients(model, rng, monkeypatch):
    """On a mesh that splits only the tokens (tensor = 1, the usual FSDP layout) every shard holds
    whole vocabulary rows: the statistics pass and the weighted sweep run per shard, and the
    trainer's gradients equal the single-device ones."""
    remainders = record_sweep_remainders(monkeypatch)
    mesh = make_mesh(4, 2, 1)
    params, teacher = _params(model, rng)
    batch = _batch(rng, B=8)
    objective = ObjectiveSection(kind="jsd", beta=0.5, skip_first=1)
    results = []
    for step_mesh in (None, mesh):
        settings = StepSettings(student=model, teacher=model, objective=objective, kernel_impl="xla",
                                valid_vocab=500, mesh=step_mesh)
        results.append(jax.jit(functools.partial(accumulated_gradients, settings=settings))(params, teacher, batch))
    assert remainders and not any(remainders)  # one call per shard on the mesh: all took the fast path
    (grads1, metrics1), (grads2, metrics2) = results
    assert float(metrics1["loss"]) == pytest.approx(float(metrics2["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads2)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


ACTIVATION_MODEL = dict(CONFIG, hidden_size=48, intermediate_size=176, num_hidden_layers=2)


@pytest.mark.parametrize("mesh_shape,sequences_per_microbatch", [((1, 8, 1), 8), ((1, 8, 1), 2), ((1, 4, 2), 2)])
def test_fsdp_step_splits_activations_and_matches_one_device(rng, mesh_shape, sequences_per_microbatch):
    """The train step on an 8-chip mesh: with fsdp 8 each chip holds 1/8 of every microbatch's
    activations (its sequences when the microbatch divides over the 8 batch shards, else 1/8 of
    the positions of each sequence), never the whole microbatch (what XLA's propagation chose
    before the decoder constrained its residual stream); with tensor 2 the positions split over
    it too. The step's new parameters equal one device's."""
    from opsd_jax.config import OptimizerSection
    from opsd_jax.distill.train_step import TrainState, make_optimizer
    from opsd_jax.distill.trainer import jitted_train_step, optimizer_state_shardings, train_state_shardings

    model = ModelConfig.from_hf(ACTIVATION_MODEL).replace(remat=True)
    B, L = 16, 40
    microbatches = B // sequences_per_microbatch
    batch = _batch(rng, B=B, L=L, T=16)
    optimizer = make_optimizer(OptimizerSection(learning_rate=1e-3, warmup_ratio=0.0), 10)
    key = jax.random.key(int(rng.integers(2**31)))
    results = []
    for mesh in (None, make_mesh(*mesh_shape)):
        params = init_params(model, key, mesh)
        opt_state = (optimizer.init(params) if mesh is None else jax.jit(
            optimizer.init, out_shardings=optimizer_state_shardings(optimizer, params, mesh))(params))
        state = TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.tree.map(jnp.copy, params))
        settings = StepSettings(student=model, teacher=model, kernel_impl="xla", valid_vocab=500, mesh=mesh,
                                objective=ObjectiveSection(kind="jsd", beta=0.5, skip_first=1),
                                microbatches=microbatches)
        if mesh is None:
            step = jax.jit(functools.partial(train_step, settings=settings, optimizer=optimizer))
        else:
            shardings = train_state_shardings(state, mesh)
            step = jitted_train_step(settings, optimizer, shardings)
            batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
            hlo = step.lower(state, batch).compile().as_text()
        if mesh is not None and mesh_shape[2] == 1:
            # Per-device MLP activations [b, t, 176], t a whole sequence or an eighth of one (the
            # stacked MLP weights' shards are [layers, 48 / 8, 176]): b x t must be the
            # microbatch's tokens over 8.
            shapes = {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", hlo)}
            mlp = {s for s in shapes if len(s) == 3 and s[2] == model.intermediate_size and s[1] in (L, L // 8)}
            assert mlp and all(s[0] * s[1] == sequences_per_microbatch * L // 8 for s in mlp), mlp
        new_state, metrics = step(state, batch)
        results.append((jax.device_get(new_state.params), jax.device_get(metrics)))
    (params1, metrics1), (params8, metrics8) = results
    assert float(metrics8["loss"]) == pytest.approx(float(metrics1["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture,overrides", [("qwen3", {"attention_bias": True}), ("qwen3-tied", {}),
                                                    ("olmo2", {}), ("olmo3", {})])
def test_weight_decay_skips_the_parameters_transformers_trainer_skips(architecture, overrides):
    """AdamW decays what transformers' Trainer decays (its get_decay_parameter_names: not norm
    weights, not biases), compared through the checkpoint's tensor names."""
    import transformers

    from opsd_jax.checkpoint.hf import get_path, tensor_mappings
    from opsd_jax.distill.train_step import decayed
    from opsd_jax.testing import tiny_hf_model

    torch_model = tiny_hf_model(architecture, seed=0, **overrides)
    names = {name for name, _ in torch_model.named_parameters()}  # a tied head is the embedding
    theirs = set(transformers.Trainer.get_decay_parameter_names(None, torch_model)) & names
    config = ModelConfig.from_hf(torch_model.config.to_dict())
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    mask = decayed(params)
    mappings = tensor_mappings(config)
    assert {m.hf_name for m in mappings} == names
    ours = {m.hf_name for m in mappings if get_path(mask, m.path)}
    assert ours == theirs
    assert any(m.hf_name.endswith(".bias") for m in mappings) == bool(overrides)


def test_weight_decay_moves_matrices_only(rng):
    """With zero gradients Adam's step is zero, so one update is the decay alone: matrices shrink
    by lr x weight_decay, norm scales keep their values."""
    from opsd_jax.config import OptimizerSection
    from opsd_jax.distill.train_step import make_optimizer

    config = ModelConfig.from_hf(CONFIG)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(1)))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    optimizer = make_optimizer(OptimizerSection(learning_rate=0.1, warmup_ratio=0.0, weight_decay=0.5), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, jax.jit(optimizer.init)(params), params)
    def check(path, update, value):
        expected = 0.0 if path[-1].key == "scale" else -0.1 * 0.5 * np.asarray(value)
        np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, atol=0, err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(check, updates, params)


def test_training_contexts_are_padded_so_positions_split_over_every_chip(tmp_path, monkeypatch):
    """The plan's (and the trainer's) train step for 31 + 6 = 37-token contexts on a 1,8,1 mesh, 2
    sequences per microbatch: the batch takes 2 of the 8 fsdp shards at most, so positions must
    split, and no axis divides 37. Unpadded, each chip computes both whole sequences' MLPs;
    padded to 48 (`train_context_lengths`: a multiple of twice the chips), an eighth of the
    positions each."""
    import json

    from opsd_jax.config import config_from_dict
    from opsd_jax.distill import trainer
    from opsd_jax.plan.programs import train_step_inputs

    (tmp_path / "config.json").write_text(json.dumps(dict(ACTIVATION_MODEL, architectures=["Qwen3ForCausalLM"])))
    c = config_from_dict({"model": {"checkpoint": str(tmp_path), "compute_dtype": "float32", "remat": True},
                          "data": {"max_prompt_tokens": 31}, "sampling": {"max_new_tokens": 6},
                          "train": {"batch_size": 16, "microbatches": 8, "mesh": "1,8,1"}})
    assert [trainer.train_context_lengths(c, chips) for chips in (1, 8, 37)] == [(37, 37), (48, 48), (74, 74)]
    # the data's own longest prompts, never more than data.max_prompt_tokens
    assert trainer.train_context_lengths(c, 8, trainer.PromptLengths(5, 50)) == (16, 48)
    model = ModelConfig.from_hf(str(tmp_path), param_dtype="float32").replace(**c.model.runtime(training=True))
    mesh = make_mesh(1, 8, 1)

    def mlp_lengths():
        step, state, batch, _ = train_step_inputs(c, model, None, mesh, 1, kernel_impl="xla")
        hlo = step.lower(state, batch).compile().as_text()
        shapes = {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", hlo)}
        return {s[1] for s in shapes if len(s) == 3 and s[0] == 2 and s[2] == model.intermediate_size}

    lengths = mlp_lengths()
    assert 48 // 8 in lengths and not lengths & {37, 48}, lengths
    monkeypatch.setattr(trainer, "train_context_lengths", lambda c, chips, prompts: (37, 37))
    assert 37 in mlp_lengths()  # what the padding prevents


@pytest.mark.parametrize("norm_over_max", [0.5, 1.0 + 5e-7, 3.0])
@pytest.mark.parametrize("max_norm", [1e-5, 1.0])
def test_clipping_is_torch_clip_grad_norm(max_norm, norm_over_max, rng):
    """The paper's Trainer clips with torch's `clip_grad_norm_`, which divides by norm + 1e-6: at
    a max_norm of 1e-5 that scales by 0.48 where optax's `clip_by_global_norm` scales by 0.5."""
    import torch

    from opsd_jax.distill.train_step import clip_by_global_norm_as_torch

    grads = {"a": rng.normal(size=(3, 5)), "b": {"c": rng.normal(size=7)}}
    norm = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: (g * max_norm * norm_over_max / norm).astype(np.float32), grads)
    clip = clip_by_global_norm_as_torch(max_norm)
    ours, _ = clip.update(jax.tree.map(jnp.asarray, grads), clip.init(None))
    tensors = [torch.tensor(g) for g in jax.tree.leaves(grads)]
    for t in tensors:
        t.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    for mine, theirs in zip(jax.tree.leaves(ours), tensors, strict=True):
        np.testing.assert_allclose(np.asarray(mine), theirs.grad.numpy(), rtol=2e-6, atol=0)


def _with_privileged_prefix(batch: Batch, rng, prefix: int = 5) -> Batch:
    """The batch with `prefix` context tokens (a stand-in for a privileged hint) before each
    teacher context: the teacher's rows move by `prefix`, the student's stay."""
    B = batch.student_tokens.shape[0]
    hint = jnp.asarray(rng.integers(3, 500, (B, prefix)), jnp.int32)
    teacher_tokens = jnp.concatenate([hint, batch.student_tokens], axis=1)
    return batch._replace(teacher_tokens=teacher_tokens, teacher_mask=jnp.ones_like(teacher_tokens),
                          teacher_index=batch.student_index + prefix)


def _assert_same(result, reference, rel=2e-5):
    (loss, _, grads), (ref_loss, _, ref_grads) = result, reference
    assert loss == pytest.approx(ref_loss, rel=rel)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5 * np.abs(a).max(), err_msg=jax.tree_util.keystr(path))


def _head_gradients_differ(result, other):
    """Whether two steps' head gradients differ far beyond `_assert_same`'s tolerance (the loss
    of a fresh model is a tiny JSD whose value can move less than its gradient does)."""
    a, b = np.asarray(result[2]["lm_head"]), np.asarray(other[2]["lm_head"])
    return np.abs(a - b).max() > 1e-2 * np.abs(b).max()


def test_a_vanilla_teacher_at_forks_scores_them_on_the_students_context(model, rng):
    """objective.fork_teacher=vanilla: at fork tokens (top_rho by student entropy) the teacher
    reads the student's own context, elsewhere its privileged one.
    - Every loss token a fork (top_rho 1): the step equals the privileged step on a batch whose
      teacher context is the student's.
    - The student as its own teacher: at forks the teacher is then the student itself (zero
      divergence, zero gradient), so the step equals the privileged step with the forks' loss
      weighted 0 (downweight_teacher_at_forks, fork_weight 0), while the privileged step without
      that weighting differs."""
    params, teacher = _params(model, rng)
    batch = _with_privileged_prefix(_batch(rng), rng)
    unprivileged = batch._replace(teacher_tokens=batch.student_tokens, teacher_mask=batch.student_mask,
                                  teacher_index=batch.student_index)

    def run(objective, teacher_params, data):
        settings = StepSettings(student=model, teacher=model, objective=objective, valid_vocab=500)
        return _loss_and_grads(params, teacher_params, data, settings)

    everywhere = ObjectiveSection(kind="jsd", skip_first=1, fork_teacher="vanilla", top_rho=1.0)
    result = run(everywhere, teacher, batch)
    assert float(result[1]["vanilla_teacher_share"]) == 1.0
    _assert_same(result, run(ObjectiveSection(kind="jsd", skip_first=1), teacher, unprivileged))
    assert _head_gradients_differ(result, run(ObjectiveSection(kind="jsd", skip_first=1), teacher, batch))

    for _ in range(50):  # forks decided by entropies clear of float32 noise at the threshold
        objective = ObjectiveSection(kind="jsd", skip_first=1, fork_teacher="vanilla", top_rho=0.3)
        if _threshold_is_clear(model, params, batch, objective):
            break
        params, teacher = _params(model, rng)
        batch = _with_privileged_prefix(_batch(rng), rng)
    else:
        raise AssertionError("no draw of 50 had its entropy threshold clear of float32 noise")
    result = run(objective, params, batch)
    share = float(result[1]["vanilla_teacher_share"])
    assert 0 < share < 1
    silenced = ObjectiveSection(kind="jsd", skip_first=1, top_rho=0.3, token_weighting="downweight_teacher_at_forks",
                                fork_weight=0.0)
    _assert_same(result, run(silenced, params, batch), rel=1e-4)
    assert _head_gradients_differ(result, run(ObjectiveSection(kind="jsd", skip_first=1), params, batch))


def test_a_vanilla_fork_teacher_needs_a_teacher():
    from opsd_jax.config import ConfigKeyError, config_from_dict

    with pytest.raises(ConfigKeyError, match="objective.fork_teacher: vanilla .* sft"):
        config_from_dict({"objective": {"kind": "sft", "fork_teacher": "vanilla"}})
    with pytest.raises(ConfigKeyError, match="fork_teacher"):
        config_from_dict({"objective": {"fork_teacher": "both"}})
    assert config_from_dict({"objective": {"fork_teacher": "vanilla"}}).objective.fork_teacher == "vanilla"
