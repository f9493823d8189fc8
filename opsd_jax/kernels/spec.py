"""The types every divergence implementation shares: its static settings and its result.

Kept apart from `api` (the dispatcher) so that backends import these without importing the
dispatcher that imports them.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax


class DivergenceOutput(NamedTuple):
    """Per-token results, float32 [N]; zero for tokens the mask ignores.

    divergence: forward KL (beta=0), reverse KL (beta=1) or generalized JSD (between).
    student_entropy / teacher_entropy: entropies of the two (temperature-scaled) distributions.
    student_logprob / teacher_logprob: log-probabilities of `targets`, None without targets.
    Gradients flow to the student only, from divergence, student_entropy and student_logprob.
    """

    divergence: jax.Array
    student_entropy: jax.Array
    teacher_entropy: jax.Array
    student_logprob: jax.Array | None = None
    teacher_logprob: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class DivergenceSpec:
    """Static settings every implementation receives (hashable: it is a jit-static argument).

    token_block / vocab_block: tile sizes; None lets the implementation choose.
    interpret: Pallas only. None runs the interpreter unless the default backend is the kernel's
      own accelerator; False forces real lowering (to compile for a TPU topology on a CPU host).
    tpu_generation: the TPU the kernel is compiled for ("v4", "v5e", "v5p", "v6e", "v7x"), None
      when it is not a TPU: sets pallas_tpu's VMEM budget (None there: a conservative one) and
      xla's default token block from hidden states (larger on TPU, xla.TPU_FUSED_TOKEN_BLOCK).
    head_hidden_shards: how many shards the stored heads' hidden dimension is split into (fsdp),
      set by the vocabulary-parallel form: a stored shard's shape decides the layout XLA gives
      the heads, and pallas_tpu reads them in that orientation (pallas_tpu.vocab_major).
    gather_token_rows: on a mesh whose fsdp axis splits both the tokens and the heads' hidden
      dimension, whether the vocabulary-parallel form (xla and the Pallas kernels) gathers the
      token rows over fsdp and splits the vocabulary further (True), gathers the heads (False),
      or takes the one that needs fewer bytes (None; vocab_parallel.row_gather_axes).
    """

    beta: float
    temperature: float = 1.0
    valid_vocab: int | None = None
    token_block: int | None = None
    vocab_block: int | None = None
    interpret: bool | None = None
    tpu_generation: str | None = None
    head_hidden_shards: int = 1
    gather_token_rows: bool | None = None
