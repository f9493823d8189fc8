"""Public divergence API: argument checks and dispatch to an implementation (the output and
settings types live in spec.py and are re-exported here).

Letters: N tokens, V vocabulary, Hs / Ht student / teacher hidden width.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from opsd_jax.kernels.spec import DivergenceOutput, DivergenceSpec

__all__ = ["IMPLS", "DivergenceOutput", "DivergenceSpec", "default_impl", "divergence", "fused_linear_divergence",
           "gradient_in_forward", "student_statistics"]

IMPLS = ("reference", "xla", "pallas_tpu", "pallas_gpu")


# Named scopes (see jax.named_scope) of the two entry points' instructions.
KERNEL_SCOPE = "fused_linear_divergence"
STATISTICS_SCOPE = "student_statistics"


def _check_scalars(beta, temperature):
    if isinstance(beta, jax.core.Tracer) or isinstance(temperature, jax.core.Tracer):
        raise TypeError("beta and temperature must be Python numbers: they select the kernel at trace time")
    beta = float(beta)
    temperature = float(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if not temperature > 0.0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return beta, temperature


def _check_matrix(name, x, ndim=2):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got {x.dtype}")


def _check_token_args(n, vocab, mask, valid_vocab, targets):
    """Validated (mask bool[N], valid_vocab or None, targets int32[N] or None)."""
    if mask is None:
        mask_N = jnp.ones((n,), jnp.bool_)
    else:
        if not hasattr(mask, "shape") or tuple(mask.shape) != (n,):
            raise ValueError(f"mask must have shape ({n},), got {getattr(mask, 'shape', type(mask))}")
        mask_N = jnp.asarray(mask).astype(jnp.bool_)
    if valid_vocab is not None:
        if isinstance(valid_vocab, bool) or not isinstance(valid_vocab, (int, np.integer)):
            raise TypeError(f"valid_vocab must be an int, got {type(valid_vocab).__name__}")
        valid_vocab = int(valid_vocab)
        if not 0 < valid_vocab <= vocab:
            raise ValueError(f"valid_vocab must lie in [1, {vocab}] (the vocabulary size), got {valid_vocab}")
        if valid_vocab == vocab:
            valid_vocab = None
    limit = vocab if valid_vocab is None else valid_vocab
    if targets is not None:
        if not hasattr(targets, "shape") or tuple(targets.shape) != (n,):
            raise ValueError(f"targets must have shape ({n},), got {getattr(targets, 'shape', type(targets))}")
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            raise TypeError(f"targets must be integer token ids, got {targets.dtype}")
        if not isinstance(targets, jax.core.Tracer):
            values = np.asarray(targets)
            bad = np.flatnonzero((values < 0) | (values >= limit))
            if bad.size:
                raise ValueError(
                    f"targets[{bad[0]}] = {values[bad[0]]} is outside the valid vocabulary [0, {limit})"
                )
        targets = jnp.asarray(targets).astype(jnp.int32)
    return mask_N, valid_vocab, targets


def default_impl(platform: str | None = None) -> str:
    """The implementation "auto" picks on `platform` (default: this process's backend): the XLA
    sweep everywhere. On TPU it was pallas_tpu until the plan could count both in Qwen3-8B's real
    train step: there xla takes 1.03 sweeps (1.28 with the student pass its loss weights need)
    where pallas_tpu takes 1.52 (KL) and 2.03 (JSD), in less memory per chip, and with no custom
    kernel whose lowering has never run on a chip (BUILD_NOTES, issue 12). pallas_tpu and
    pallas_gpu stay a config choice (`train.kernel`). `platform` is unused and kept for callers
    that name where the job runs."""
    del platform
    return "xla"


def _resolve(impl: str) -> str:
    if impl == "auto":
        return default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'auto' or one of {IMPLS}, got {impl!r}")
    return impl


def _implementation(impl: str, fused: bool) -> Callable:
    # Imported lazily so that importing the API never pulls in Pallas backends it will not use.
    if impl == "reference":
        from opsd_jax.kernels import reference as module
    elif impl == "xla":
        from opsd_jax.kernels import xla as module
    elif impl == "pallas_tpu":
        from opsd_jax.kernels import pallas_tpu as module
    else:
        from opsd_jax.kernels import pallas_gpu as module
    return module.fused_linear_divergence if fused else module.divergence


def divergence(
    student_logits,
    teacher_logits,
    *,
    beta: float,
    temperature: float = 1.0,
    mask=None,
    valid_vocab: int | None = None,
    targets=None,
    impl: str = "auto",
    token_block: int | None = None,
    vocab_block: int | None = None,
    interpret: bool | None = None,
) -> DivergenceOutput:
    """Per-token divergence between student and teacher next-token distributions.

    student_logits, teacher_logits: float (f32 or bf16) [N, V]; math runs in float32.
    beta: 0 forward KL(p_t || p_s), 1 reverse KL(p_s || p_t), else the generalized JSD with mixture
      beta * p_t + (1 - beta) * p_s. temperature: both logits are divided by it.
    mask: bool [N] or None; ignored tokens get zero outputs and exactly zero gradient.
    valid_vocab: entries at or past it (embedding padding) are excluded from both distributions.
    targets: int [N] or None; adds both log-probabilities of these token ids.
    token_block, vocab_block, interpret: tuning and Pallas settings, see DivergenceSpec.
    Returns DivergenceOutput of float32 [N] arrays.
    """
    beta, temperature = _check_scalars(beta, temperature)
    _check_matrix("student_logits", student_logits)
    _check_matrix("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same [tokens, vocab] shape"
        )
    n, vocab = student_logits.shape
    mask_N, valid_vocab, targets_N = _check_token_args(n, vocab, mask, valid_vocab, targets)
    spec = DivergenceSpec(beta, temperature, valid_vocab, token_block, vocab_block, interpret, _tpu_generation(None))
    fn = _implementation(_resolve(impl), fused=False)
    return fn(student_logits, teacher_logits, mask_N, targets_N, spec)


def fused_linear_divergence(
    student_hidden,
    student_head,
    teacher_hidden,
    teacher_head,
    *,
    beta: float,
    temperature: float = 1.0,
    mask=None,
    valid_vocab: int | None = None,
    targets=None,
    impl: str = "auto",
    token_block: int | None = None,
    vocab_block: int | None = None,
    interpret: bool | None = None,
    mesh: Mesh | None = None,
    weights=None,
    gather_token_rows: bool | None = None,
) -> DivergenceOutput:
    """`divergence` of student_hidden @ student_head and teacher_hidden @ teacher_head, never
    forming the [N, V] logits.

    student_hidden: float [N, Hs]; student_head: float [Hs, V]; teacher_hidden: float [N, Ht];
    teacher_head: float [Ht, V]. Gradients reach student_hidden and student_head only.
    mesh: the caller's device mesh (axes named as in parallel.MESH_AXES). With more than one
      device the call runs in a shard_map (vocab_parallel.py): tokens split like the logical
      "batch" axis, the heads' vocabulary like "vocab", which a Mosaic kernel inside a sharded
      jit needs. None: one device, or a shard_map the caller wrote.
    weights: float [N] or None (no gradient flows into it): the cotangent the caller's loss will
      give `divergence`, up to one scalar factor (d loss / d divergence; None: the mask, i.e.
      a sum or mean). Where `gradient_in_forward` holds, the forward forms the student's
      gradients for it in its one sweep, and a backward whose divergence cotangent is c * weights
      (entropy and log-prob cotangents zero) only scales them; any other cotangent is still
      exact, for one more sweep. Statistics-first implementations do not need it.
    gather_token_rows: xla and the Pallas kernels on a mesh whose fsdp axis splits the tokens
      and the heads' hidden dimension: gather the token rows over fsdp and split the vocabulary
      further (True), gather the heads as FSDP does (False), or whichever needs fewer bytes per
      chip (None).
    Other arguments and the result are as in `divergence`.
    """
    beta, temperature = _check_scalars(beta, temperature)
    for name, x in (
        ("student_hidden", student_hidden),
        ("student_head", student_head),
        ("teacher_hidden", teacher_hidden),
        ("teacher_head", teacher_head),
    ):
        _check_matrix(name, x)
    n, hs = student_hidden.shape
    if student_head.shape[0] != hs:
        raise ValueError(
            f"student_head has {student_head.shape[0]} rows but student_hidden has width {hs}"
        )
    if teacher_head.shape[0] != teacher_hidden.shape[1]:
        raise ValueError(
            f"teacher_head has {teacher_head.shape[0]} rows but teacher_hidden has width "
            f"{teacher_hidden.shape[1]}"
        )
    if teacher_hidden.shape[0] != n:
        raise ValueError(
            f"teacher_hidden has {teacher_hidden.shape[0]} tokens but student_hidden has {n}"
        )
    if teacher_head.shape[1] != student_head.shape[1]:
        raise ValueError(
            f"student_head vocabulary {student_head.shape[1]} differs from teacher_head "
            f"vocabulary {teacher_head.shape[1]}"
        )
    vocab = student_head.shape[1]
    mask_N, valid_vocab, targets_N = _check_token_args(n, vocab, mask, valid_vocab, targets)
    _check_mesh(mesh)
    weights_N = None
    if weights is not None:
        if not hasattr(weights, "shape") or tuple(weights.shape) != (n,):
            raise ValueError(f"weights must have shape ({n},), got {getattr(weights, 'shape', type(weights))}")
        if not jnp.issubdtype(weights.dtype, jnp.floating):
            raise TypeError(f"weights must be floating point, got {weights.dtype}")
        weights_N = jax.lax.stop_gradient(jnp.asarray(weights).astype(jnp.float32))
    spec = DivergenceSpec(beta, temperature, valid_vocab, token_block, vocab_block, interpret,
                          _tpu_generation(mesh), gather_token_rows=gather_token_rows)
    impl = _resolve(impl)
    fn = _implementation(impl, fused=True)
    args = (student_hidden, student_head, teacher_hidden, teacher_head, mask_N, targets_N, weights_N, spec)
    from opsd_jax.kernels import vocab_parallel

    # The scope names the kernel's instructions in the compiled program, which is how
    # `opsd-jax plan` tells the kernel's FLOPs from the model's.
    with jax.named_scope(KERNEL_SCOPE):
        if mesh is None or mesh.size == 1:
            return fn(*args)
        return vocab_parallel.fused_linear_divergence(*args, mesh=mesh, impl=impl, whole=fn)


def gradient_in_forward(impl: str = "auto", mesh: Mesh | None = None, *, tokens: int, vocab: int) -> bool:
    """Whether `fused_linear_divergence` with this impl and mesh (for `tokens` x `vocab`) forms the
    student's gradients in its forward sweep, for its `weights`: then a caller whose loss weights
    depend on the student's own entropy or target log-probability should get those first from
    `student_statistics` (a quarter of the sweep) and pass the final weights. Elsewhere the
    gradient runs in the backward with the actual cotangents and `weights` are not needed."""
    _check_mesh(mesh)
    from opsd_jax.kernels import vocab_parallel

    return vocab_parallel.gradient_in_forward(_resolve(impl), mesh, tokens, vocab)


def student_statistics(
    student_hidden,
    student_head,
    *,
    temperature: float = 1.0,
    mask=None,
    valid_vocab: int | None = None,
    targets=None,
    token_block: int | None = None,
    mesh: Mesh | None = None,
):
    """(student entropy, student log-probability of `targets` or None): float32 [N], zero for
    ignored tokens, no gradient; the same values `fused_linear_divergence` returns (to float32
    rounding), from the student's projection alone (2 N Hs V FLOPs against its 8). An XLA sweep
    on every backend; on a mesh, vocabulary-parallel as the fused form. For loss weights that
    depend on these, ahead of a fused call that wants its final `weights`."""
    _, temperature = _check_scalars(0.0, temperature)
    _check_matrix("student_hidden", student_hidden)
    _check_matrix("student_head", student_head)
    n, hs = student_hidden.shape
    if student_head.shape[0] != hs:
        raise ValueError(f"student_head has {student_head.shape[0]} rows but student_hidden has width {hs}")
    mask_N, valid_vocab, targets_N = _check_token_args(n, student_head.shape[1], mask, valid_vocab, targets)
    _check_mesh(mesh)
    spec = DivergenceSpec(0.0, temperature, valid_vocab, token_block)
    from opsd_jax.kernels import vocab_parallel

    hidden, head = jax.lax.stop_gradient((student_hidden, student_head))
    with jax.named_scope(STATISTICS_SCOPE):
        return vocab_parallel.student_statistics(hidden, head, mask_N, targets_N, spec, mesh=mesh)


def _check_mesh(mesh):
    if mesh is None:
        return
    from opsd_jax.parallel import MESH_AXES

    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if set(mesh.axis_names) != set(MESH_AXES):
        raise ValueError(f"mesh axes must be {MESH_AXES} (parallel.make_mesh), got {tuple(mesh.axis_names)}")


def _tpu_generation(mesh: Mesh | None) -> str | None:
    """The TPU generation the kernel is compiled for: the mesh's devices' (which may be a
    topology's, compiled ahead of time from a CPU host), else the default device's."""
    from opsd_jax.kernels.tpu_vmem import generation_of

    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return generation_of(getattr(device, "device_kind", ""))
