"""Fused log-softmax / divergence kernels for distillation.

One public function per input form, several implementations behind `impl`:
  divergence(student_logits, teacher_logits, ...)            from [N, V] logits
  fused_linear_divergence(student_hidden, student_head, ...)  from hidden states and heads
  student_statistics(student_hidden, student_head, ...)      the student's entropy and log-probs alone
  topk_divergence(student_logits, teacher_ids, teacher_logprobs, ...)  teacher top-k + tail bucket
"""

from opsd_jax.kernels.api import (
    IMPLS,
    DivergenceOutput,
    DivergenceSpec,
    default_impl,
    divergence,
    fused_linear_divergence,
    gradient_in_forward,
    student_statistics,
)
from opsd_jax.kernels.topk import TopKOutput, teacher_topk, topk_divergence

__all__ = [
    "IMPLS",
    "DivergenceOutput",
    "DivergenceSpec",
    "default_impl",
    "divergence",
    "fused_linear_divergence",
    "gradient_in_forward",
    "student_statistics",
    "TopKOutput",
    "teacher_topk",
    "topk_divergence",
]
