"""One pure, jittable distillation step: student forward+backward, teacher forward, loss, AdamW.

Shape letters: B sequences, Ls / Lt student / teacher context length, T completion positions,
D model width, N = B * T.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from opsd_jax.config import ObjectiveSection, OptimizerSection
from opsd_jax.distill import objectives
from opsd_jax.kernels import (
    fused_linear_divergence,
    gradient_in_forward,
    student_statistics,
    teacher_topk,
    topk_divergence,
)
from opsd_jax.models import ModelConfig, forward_hidden, logits_from_hidden

_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}
_DIVERGENCES = ("jsd", "forward_kl", "reverse_kl")


class Batch(NamedTuple):
    """Rollouts aligned for scoring (all int32 unless noted; right-padded)."""

    student_tokens: jax.Array  # [B, Ls] student prompt + completion
    student_mask: jax.Array  # [B, Ls] 1 for real tokens
    teacher_tokens: jax.Array  # [B, Lt] teacher prompt + the same completion
    teacher_mask: jax.Array  # [B, Lt]
    student_index: jax.Array  # [B, T] row of the student context whose output predicts completion token t
    teacher_index: jax.Array  # [B, T] the same for the teacher context
    targets: jax.Array  # [B, T] completion tokens
    lengths: jax.Array  # [B] completion lengths
    sampler_logprobs: jax.Array  # float32 [B, T] log-prob of each token under the sampler's model


class TrainState(NamedTuple):
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    teacher_params: dict | None  # None: the teacher is the live student (stop-gradient)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Everything static about a step (hashable: closed over, never traced)."""

    student: ModelConfig
    teacher: ModelConfig
    objective: ObjectiveSection
    teacher_kind: str = "frozen"
    ema_rate: float = 0.99
    microbatches: int = 1
    kernel_impl: str = "auto"
    # Pallas kernels: None interprets them off their accelerator; False lowers them for it (a plan
    # compiling for TPU on a CPU host).
    kernel_interpret: bool | None = None
    valid_vocab: int | None = None  # the tokenizer's size: padded embedding rows carry no probability
    # The trainer's mesh: on more than one device the divergence kernel runs vocabulary-parallel
    # in a shard_map (a Mosaic kernel cannot be partitioned by XLA). None: one device.
    mesh: jax.sharding.Mesh | None = None


def learning_rate_schedule(section: OptimizerSection, total_steps: int) -> optax.Schedule:
    """Learning rate by optimizer step: linear warmup from 0, then cosine decay to 0 at
    `total_steps`, as transformers' cosine schedule with warmup (the first update uses lr 0)."""
    # ceil, as transformers' TrainingArguments.get_warmup_steps (the paper: ceil(0.03 * 234) = 8).
    warmup = max(math.ceil(section.warmup_ratio * total_steps), 0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=section.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0,
    )


def decayed(params):
    """Pytree of bools over `params`: True where AdamW's weight decay applies. Norm scales and
    biases are left out, as transformers' Trainer groups them (`get_decay_parameter_names`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("scale", "bias"), params)


def clip_by_global_norm_as_torch(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
    """Scale every gradient by min(1, max_norm / (norm + eps)), as torch's `clip_grad_norm_` (and
    so the paper's Trainer) does. optax's `clip_by_global_norm` divides by the norm alone, which
    differs by eps / norm: 2e-6 relative near the paper's clip of 1, 5% for a norm of 2e-5."""

    def scale(updates, params=None):
        del params
        factor = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + eps))
        return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates)

    return optax.stateless(scale)


def make_optimizer(section: OptimizerSection, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm as torch does, then AdamW on `learning_rate_schedule` (decay on
    `decayed`)."""
    return optax.chain(
        clip_by_global_norm_as_torch(section.max_grad_norm),
        optax.adamw(learning_rate_schedule(section, total_steps), b1=section.b1, b2=section.b2,
                    weight_decay=section.weight_decay, mask=decayed),
    )


def _gather_rows(hidden_BxLxD, index_BxT):
    return jnp.take_along_axis(hidden_BxLxD, index_BxT[..., None], axis=1)


def loss_and_metrics(params, teacher_params, batch: Batch, settings: StepSettings):
    """(loss, metrics) for one (micro)batch; gradients reach the student parameters only."""
    objective = settings.objective
    hidden_s, head_s = forward_hidden(params, settings.student, batch.student_tokens,
                                      attention_mask=batch.student_mask)
    rows_s_BxTxD = _gather_rows(hidden_s, batch.student_index)
    if objective.kind == "sft":
        # Supervised warm start: the targets are the data's own responses and no teacher is
        # consulted; the kernel still runs (for the log-probs and entropies) against the student.
        rows_t_BxTxD, head_t = jax.lax.stop_gradient((rows_s_BxTxD, head_s))
    else:
        hidden_t, head_t = forward_hidden(teacher_params, settings.teacher, batch.teacher_tokens,
                                          attention_mask=batch.teacher_mask)
        hidden_t, head_t = jax.lax.stop_gradient((hidden_t, head_t))
        rows_t_BxTxD = _gather_rows(hidden_t, batch.teacher_index)
    B, T = batch.targets.shape
    mask_BxT = objectives.completion_mask(
        batch.lengths, T, skip_first=objective.skip_first, window=objective.window,
        window_from=objective.window_from,
    )
    beta = _BETA.get(objective.kind, objective.beta)
    rows_s_NxD = rows_s_BxTxD.reshape(B * T, -1)
    mask_N = mask_BxT.reshape(-1)
    targets_N = batch.targets.reshape(-1)

    def importance(student_logprob_BxT):
        return objectives.sequence_importance(
            student_logprob_BxT, batch.sampler_logprobs, mask_BxT, objective.importance_cap,
            clamp="token" if objective.importance == "paper" else "sequence")

    kernel_weights_N = early = None
    single_sweep = objective.kind in _DIVERGENCES and gradient_in_forward(
        settings.kernel_impl, settings.mesh, tokens=B * T, vocab=head_s.shape[1])
    if single_sweep or objective.fork_teacher == "vanilla":
        # The loss weights depend on the student's own entropies (token weighting) and target
        # log-probs (importance), and so do the fork tokens a vanilla teacher scores; the kernel
        # forms the gradients in its one sweep for the weights it is given, so get those two
        # first (the student's projection alone, a quarter of the sweep) and pass the loss's
        # final per-token cotangents.
        entropy_N, logprob_N = student_statistics(
            rows_s_NxD, head_s, temperature=objective.temperature, mask=mask_N, valid_vocab=settings.valid_vocab,
            targets=targets_N, mesh=settings.mesh)
        early = (entropy_N.reshape(B, T), logprob_N.reshape(B, T))
    fork_share = None
    if objective.fork_teacher == "vanilla":
        forks_BxT = objectives.fork_positions(mask_BxT, early[0], objective.top_rho)
        rows_t_BxTxD = _vanilla_teacher_at_forks(rows_t_BxTxD, teacher_params, batch, forks_BxT, settings)
        fork_share = forks_BxT.sum() / jnp.maximum(mask_BxT.sum(), 1)
    if single_sweep:
        early_weights = objectives.token_weights(mask_BxT, early[0], objective.token_weighting,
                                                 top_rho=objective.top_rho, fork_weight=objective.fork_weight)
        kernel_weights_N = objectives.loss_weights(early_weights, mask_BxT, importance(early[1]),
                                                   objective.reduction).reshape(-1)
    out = fused_linear_divergence(
        rows_s_NxD, head_s, rows_t_BxTxD.reshape(B * T, -1), head_t,
        beta=beta, temperature=objective.temperature, mask=mask_N,
        targets=targets_N, impl=settings.kernel_impl, valid_vocab=settings.valid_vocab,
        interpret=settings.kernel_interpret, mesh=settings.mesh, weights=kernel_weights_N,
    )
    student_logprob = out.student_logprob.reshape(B, T)
    teacher_logprob = out.teacher_logprob.reshape(B, T)
    student_entropy = out.student_entropy.reshape(B, T)
    teacher_entropy = out.teacher_entropy.reshape(B, T)
    # With the early pass, the loss uses the values its weights came from.
    weights = objectives.token_weights(mask_BxT, student_entropy if early is None else early[0],
                                       objective.token_weighting, top_rho=objective.top_rho,
                                       fork_weight=objective.fork_weight)
    if objective.kind == "topk":
        # Materializes [N, V] logits for both models: the top-k form exists for teachers whose
        # distribution is only kept (or served) as its top tokens.
        student_logits_NxV = logits_from_hidden(rows_s_NxD, head_s, settings.student)
        teacher_logits_NxV = logits_from_hidden(rows_t_BxTxD.reshape(B * T, -1), head_t, settings.teacher)
        ids_NxK, logprobs_NxK = teacher_topk(teacher_logits_NxV, objective.teacher_top_k,
                                             temperature=objective.temperature, valid_vocab=settings.valid_vocab)
        top = topk_divergence(student_logits_NxV, ids_NxK, logprobs_NxK, beta=objective.beta,
                              temperature=objective.temperature, mask=mask_N,
                              valid_vocab=settings.valid_vocab)
        per_token = top.divergence.reshape(B, T)
        scale_B = importance(student_logprob)
    elif objective.kind == "sft":
        per_token = -student_logprob  # teacher-forced cross entropy
        scale_B = jnp.ones(B)
    elif objective.kind == "sampled_reverse_kl":
        per_token = objectives.sampled_reverse_kl_loss(
            student_logprob, teacher_logprob, batch.sampler_logprobs, mask_BxT,
            discount=objective.discount, ratio_cap=objective.importance_cap,
        )
        scale_B = jnp.ones(B)
    else:
        per_token = out.divergence.reshape(B, T)
        scale_B = importance(student_logprob if early is None else early[1])
    loss = objectives.reduce_loss(per_token, weights, mask_BxT, scale_B, objective.reduction)
    count = jnp.maximum(mask_BxT.sum(), 1)

    def masked_mean(x_BxT):
        return jnp.where(mask_BxT, x_BxT, 0.0).sum() / count

    metrics = {
        "loss": loss,
        "divergence": masked_mean(out.divergence.reshape(B, T)),
        "student_entropy": masked_mean(student_entropy),
        "teacher_entropy": masked_mean(teacher_entropy),
        "advantage": masked_mean(teacher_logprob - student_logprob),
        "importance_ratio_mean": scale_B.mean(),
        "importance_ratio_max": scale_B.max(),
        "loss_tokens": mask_BxT.sum(),
    }
    if fork_share is not None:
        metrics["vanilla_teacher_share"] = fork_share  # of loss tokens: the forks
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def _vanilla_teacher_at_forks(rows_t_BxTxD, teacher_params, batch: Batch, forks_BxT, settings: StepSettings):
    """[B, T, D] teacher rows: at fork tokens the teacher's on the student's own context (the
    vanilla teacher), elsewhere the given (privileged) ones. One head serves both: the contexts
    differ, the teacher does not."""
    hidden_v, _ = forward_hidden(teacher_params, settings.teacher, batch.student_tokens,
                                 attention_mask=batch.student_mask)
    rows_v_BxTxD = jax.lax.stop_gradient(_gather_rows(hidden_v, batch.student_index))
    return jnp.where(forks_BxT[..., None], rows_v_BxTxD.astype(rows_t_BxTxD.dtype), rows_t_BxTxD)


def accumulated_gradients(params, teacher_params, batch: Batch, settings: StepSettings):
    """(mean gradient, metrics) over `settings.microbatches` equal slices of the batch, scanned so
    only one microbatch's activations live at a time. For equal-sized microbatches this is the
    full batch's gradient whenever the reduction is a mean over sequences or tokens per slice."""
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
    M = settings.microbatches
    if M == 1:
        (_, metrics), grads = grad_fn(params, teacher_params, batch, settings)
        return grads, metrics
    # Strided: microbatch i is rows i, i + M, ..., so it spans every chip the batch is split over
    # (contiguous slices of a batch placed in contiguous blocks would sit on one or two chips).
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // M, M, *x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, microbatch):
        (_, metrics), grads = grad_fn(params, teacher_params, Batch(*microbatch), settings)
        return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    first = Batch(*jax.tree.map(lambda x: x[0], micro))
    _, metric_shapes = jax.eval_shape(lambda: loss_and_metrics(params, teacher_params, first, settings))
    zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, tuple(micro))
    grads = jax.tree.map(lambda g: g / M, grads)
    metrics = jax.tree.map(lambda m: m / M, metrics)
    metrics["loss_tokens"] = metrics["loss_tokens"] * M  # a count: summed, not averaged
    return grads, metrics


def train_step(state: TrainState, batch: Batch, *, settings: StepSettings,
               optimizer: optax.GradientTransformation):
    """Returns (new state, metrics). The teacher is frozen, an EMA of the student (updated after
    the step) or the live student; it never receives gradients.

    Traced under the trainer's mesh as the context mesh, so the decoder can pin its activations'
    batch to the data and fsdp axes (`parallel.constrain`) and TPU attention can find its mesh.
    """
    if settings.mesh is not None:
        with jax.sharding.use_abstract_mesh(settings.mesh.abstract_mesh):
            return _train_step(state, batch, settings=settings, optimizer=optimizer)
    return _train_step(state, batch, settings=settings, optimizer=optimizer)


def _train_step(state: TrainState, batch: Batch, *, settings: StepSettings,
                optimizer: optax.GradientTransformation):
    teacher_params = state.params if state.teacher_params is None else state.teacher_params
    grads, metrics = accumulated_gradients(state.params, jax.lax.stop_gradient(teacher_params), batch, settings)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_teacher = state.teacher_params
    if settings.teacher_kind == "ema":
        rate = settings.ema_rate
        new_teacher = jax.tree.map(lambda t, p: rate * t + (1 - rate) * p.astype(t.dtype), state.teacher_params, params)
    return TrainState(state.step + 1, params, opt_state, new_teacher), metrics
