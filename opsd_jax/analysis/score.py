"""Per-token entropies and log-probabilities of one rollout under the student, the privileged
teacher and the vanilla teacher, from the fused kernel (no [tokens, vocab] logits).

The rollout tokens follow three contexts: the student prompt, the privileged teacher prompt and
the vanilla teacher prompt (the student prompt seen by the teacher's weights). Batches are built
by the trainer's `build_batch`, so positions align exactly as in training.

On a mesh the batch's rollouts split over the data and fsdp axes, the decoder pins its residual
stream to them, and the divergence kernel runs vocabulary-parallel, exactly as in the train step;
`opsd-jax plan` compiles this same function at the evaluation's longest rollouts.

Letters: B rollouts, T completion positions, D model width.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from opsd_jax.distill.train_step import Batch, _gather_rows
from opsd_jax.distill.trainer import build_batch
from opsd_jax.kernels import fused_linear_divergence
from opsd_jax.models import ModelConfig, forward_hidden


class TokenScores(NamedTuple):
    """float32 [B, T] each; zero past a rollout's length. The divergences are the trainer's
    full-vocabulary objective at each position (the kernel's generalized JSD at `beta`: 0 forward
    KL, 1 reverse KL) between the student and the privileged / the vanilla teacher."""

    student_entropy: jax.Array
    privileged_entropy: jax.Array
    vanilla_entropy: jax.Array
    student_logprob: jax.Array
    privileged_logprob: jax.Array
    vanilla_logprob: jax.Array
    privileged_divergence: jax.Array
    vanilla_divergence: jax.Array


class _Completion(NamedTuple):
    token_ids: list
    model_logprobs: list


def _teacher_side(rows_s_NxD, head_s, teacher_params, teacher: ModelConfig, batch: Batch, mask_N, beta, impl,
                  valid_vocab, mesh):
    hidden_t, head_t = forward_hidden(teacher_params, teacher, batch.teacher_tokens, attention_mask=batch.teacher_mask)
    rows_t_NxD = _gather_rows(hidden_t, batch.teacher_index).reshape(rows_s_NxD.shape[0], -1)
    return fused_linear_divergence(rows_s_NxD, head_s, rows_t_NxD, head_t, beta=beta, mask=mask_N,
                                   targets=batch.targets.reshape(-1), impl=impl, valid_vocab=valid_vocab, mesh=mesh)


# The divergence reported per token unless asked otherwise: the paper's objective, JSD at beta 0.5.
DEFAULT_BETA = 0.5


@functools.partial(jax.jit, static_argnames=("student", "teacher", "beta", "impl", "valid_vocab", "mesh",
                                             "vanilla_is_student"))
def token_scores(student_params, teacher_params, privileged: Batch, vanilla: Batch, *, student: ModelConfig,
                 teacher: ModelConfig, beta: float = DEFAULT_BETA, impl: str = "auto", valid_vocab: int | None = None,
                 mesh: Mesh | None = None, vanilla_is_student: bool = False) -> TokenScores:
    """Scores of `privileged.targets` (the same tokens as `vanilla.targets`) under the three models.

    privileged / vanilla: Batches whose student parts are identical and whose teacher parts hold
    the privileged and the vanilla teacher contexts. teacher_params None: the student's own
    weights (self-distillation; one copy on the chips). vanilla_is_student: the vanilla teacher
    is the student itself (its own weights on the student's prompt), so its scores are the
    student's, exactly: no third forward, whose other padding would round differently and turn
    the vanilla advantage, zero by definition, into noise. mesh: the mesh the parameters and
    batches lie on (None: one device).
    """
    if mesh is None or mesh.size == 1:
        return _token_scores(student_params, teacher_params, privileged, vanilla, student=student, teacher=teacher,
                             beta=beta, impl=impl, valid_vocab=valid_vocab, mesh=None,
                             vanilla_is_student=vanilla_is_student)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return _token_scores(student_params, teacher_params, privileged, vanilla, student=student, teacher=teacher,
                             beta=beta, impl=impl, valid_vocab=valid_vocab, mesh=mesh,
                             vanilla_is_student=vanilla_is_student)


def _token_scores(student_params, teacher_params, privileged, vanilla, *, student, teacher, beta, impl, valid_vocab,
                  mesh, vanilla_is_student):
    if vanilla_is_student and teacher_params is not None:
        raise ValueError("vanilla_is_student needs teacher_params None (the student's own weights)")
    teacher_params = student_params if teacher_params is None else teacher_params
    B, T = privileged.targets.shape
    mask_BxT = jnp.arange(T)[None, :] < privileged.lengths[:, None]
    hidden_s, head_s = forward_hidden(student_params, student, privileged.student_tokens,
                                      attention_mask=privileged.student_mask)
    rows_s_NxD = _gather_rows(hidden_s, privileged.student_index).reshape(B * T, -1)
    out_p = _teacher_side(rows_s_NxD, head_s, teacher_params, teacher, privileged, mask_BxT.reshape(-1), beta, impl,
                          valid_vocab, mesh)
    shape = lambda x: x.reshape(B, T)  # noqa: E731
    if vanilla_is_student:
        vanilla_entropy, vanilla_logprob = out_p.student_entropy, out_p.student_logprob
        vanilla_divergence = jnp.zeros_like(out_p.divergence)
    else:
        out_v = _teacher_side(rows_s_NxD, head_s, teacher_params, teacher, vanilla, mask_BxT.reshape(-1), beta, impl,
                              valid_vocab, mesh)
        vanilla_entropy, vanilla_logprob, vanilla_divergence = out_v.teacher_entropy, out_v.teacher_logprob, \
            out_v.divergence
    return TokenScores(shape(out_p.student_entropy), shape(out_p.teacher_entropy), shape(vanilla_entropy),
                       shape(out_p.student_logprob), shape(out_p.teacher_logprob), shape(vanilla_logprob),
                       shape(out_p.divergence), shape(vanilla_divergence))


# Up to this many tokens lengths pad to a power of two; above it to the next multiple of a quarter
# of the power of two below, so a 38,912-token rollout pads to 40,960 (not 65,536) and each
# doubling of length adds at most four compiled shapes.
POWER_OF_TWO_UP_TO = 4096


def bucket_length(n: int, minimum: int = 32) -> int:
    """The padded length `n` tokens are scored at: a handful of compiled shapes instead of one per
    batch, at most 25% padding above POWER_OF_TWO_UP_TO."""
    if n <= POWER_OF_TWO_UP_TO:
        return max(minimum, 1 << max(n - 1, 0).bit_length())
    step = (1 << (n.bit_length() - 1)) // 4
    return -(-n // step) * step


def batch_lengths(student_prompts, teacher_prompts, completions) -> tuple[int, int, int]:
    """(student_length, teacher_length, completion_length) of a batch: each context padded from its
    own longest prompt + completion, not from the longest prompt plus the padded completion."""
    completion = bucket_length(max(completions))
    student = bucket_length(max(p + n for p, n in zip(student_prompts, completions)))
    teacher = bucket_length(max(p + n for p, n in zip(teacher_prompts, completions)))
    return student, teacher, completion


def vanilla_teacher_is_student(teacher_params, vanilla_pairs) -> bool:
    """The student's own weights (teacher_params None) on the student's own prompts: the vanilla
    teacher is the student, and its advantage and divergence are zero by definition."""
    return teacher_params is None and all(v.teacher_ids == v.student_ids for v in vanilla_pairs)


def score_rollouts(student_params, student: ModelConfig, teacher_params, teacher: ModelConfig, privileged_pairs,
                   vanilla_pairs, token_ids, *, batch_size: int = 4, beta: float = DEFAULT_BETA, impl: str = "auto",
                   valid_vocab: int | None = None, mesh: Mesh | None = None,
                   progress=None) -> list[dict[str, np.ndarray]]:
    """Per rollout, in the order given, {field of TokenScores: float32[n]} for its n completion tokens.

    privileged_pairs / vanilla_pairs: PromptPair per rollout (same student prompt); token_ids:
    the completions; teacher_params None: the student is its own teacher (and, where every vanilla
    prompt is the student's, its own vanilla teacher: token_scores' vanilla_is_student). Rollouts are scored in
    batches of `batch_size` of similar length (sorted, so a short rollout is not padded to a long
    one), each padded to `batch_lengths`. mesh: where the parameters lie; each batch is placed
    with its rollouts over the data and fsdp axes.
    """
    from opsd_jax.parallel import logical_sharding

    vanilla_is_student = vanilla_teacher_is_student(teacher_params, vanilla_pairs)

    def total(i):
        return max(len(privileged_pairs[i].teacher_ids), len(vanilla_pairs[i].teacher_ids)) + len(token_ids[i])

    order = sorted(range(len(token_ids)), key=total)
    sharding = None if mesh is None else logical_sharding(mesh, ("batch",), (batch_size,))
    results: list = [None] * len(token_ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        pad = batch_size - len(chunk)
        completions = [_Completion(list(token_ids[i]), [0.0] * len(token_ids[i])) for i in chunk]
        completions += [_Completion([], [])] * pad
        p_pairs = [privileged_pairs[i] for i in chunk] + [privileged_pairs[chunk[0]]] * pad
        v_pairs = [vanilla_pairs[i] for i in chunk] + [vanilla_pairs[chunk[0]]] * pad
        lengths = [len(c.token_ids) for c in completions]
        student_length, teacher_length, T = batch_lengths(
            [len(p.student_ids) for p in p_pairs], [max(len(p.teacher_ids), len(v.teacher_ids))
                                                    for p, v in zip(p_pairs, v_pairs)], lengths)
        batches = [build_batch(pairs, completions, student_length=student_length, teacher_length=teacher_length,
                               completion_length=T) for pairs in (p_pairs, v_pairs)]
        if sharding is not None:
            batches = jax.device_put(batches, sharding)
        scores = jax.device_get(token_scores(student_params, teacher_params, *batches, student=student,
                                             teacher=teacher, beta=beta, impl=impl, valid_vocab=valid_vocab,
                                             mesh=mesh, vanilla_is_student=vanilla_is_student))
        for row, i in enumerate(chunk):
            n = len(token_ids[i])
            results[i] = {name: np.asarray(value[row, :n], np.float32) for name, value in scores._asdict().items()}
        if progress is not None:
            progress(len(chunk))
    return results
