"""pallas_tpu's pl.CostEstimates (what XLA's cost_analysis() counts for the Mosaic kernels) against
counts made by hand from the grid: the matmuls exactly, the elementwise work and the exps within
bounds, the HBM bytes from the blocks each kernel fetches. No libtpu needed; the compiled figures
are checked in test_pallas_tpu_aot.py."""

import jax
import jax.numpy as jnp
import pytest

from opsd_jax.kernels import pallas_tpu
from opsd_jax.kernels.spec import DivergenceSpec

# Two token blocks; the vocabulary is 2.5 blocks, so the last one is partial and computed in full.
N, HS, HT, V, R, C = 512, 256, 384, 1280, 256, 512
TOKEN_BLOCKS, VOCAB_BLOCKS = 2, 3
STEPS = TOKEN_BLOCKS * VOCAB_BLOCKS
TILE = R * C
# Elementwise FLOPs per tile element, far above what rows.py does (about 20-60) and far below
# one matmul's 2 H: a bound that catches a missing or double-counted matmul, not the exact count.
ELEMENTWISE = 128


def _inputs():
    return (jax.ShapeDtypeStruct((N, HS), jnp.bfloat16), jax.ShapeDtypeStruct((HS, V), jnp.float32),
            jax.ShapeDtypeStruct((N, HT), jnp.bfloat16), jax.ShapeDtypeStruct((HT, V), jnp.float32))


def _matmuls(widths):
    """FLOPs of one tile's [R, H] x [H, C] products, one per width, over every step of the grid."""
    return STEPS * sum(2 * R * h * C for h in widths)


# exps per tile element of the gradient: the student's probabilities (and, for beta 0, the
# teacher's), plus for the JSD the log-ratio's expm1 (an exp away from 0) and log1p.
GRAD_EXPS = {0.0: 2, 0.5: 3, 1.0: 1}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_statistics_kernel_counts_both_projections_of_every_tile(beta):
    spec = DivergenceSpec(beta=beta)
    est = pallas_tpu.stats_cost(_inputs(), True, R, C, spec)
    matmul = _matmuls((HS, HT))
    assert matmul <= est.flops <= matmul + STEPS * ELEMENTWISE * TILE
    # per element the two exponentials (the KLs' expm1 is a polynomial, the plain difference of the
    # two beyond it); per row a few for moving the running maxima
    assert 2 * STEPS * TILE <= est.transcendentals <= STEPS * (2 * TILE + 16 * R)
    rows_bytes = N * (HS + HT) * 2
    heads_bytes = V * (HS + HT) * 4
    # targets read, eight statistics and two target logits written
    assert est.bytes_accessed == rows_bytes + TOKEN_BLOCKS * heads_bytes + 11 * N * 4


def test_jsd_pass_counts_both_projections_and_the_log_ratios():
    est = pallas_tpu.jsd_cost(_inputs(), R, C, DivergenceSpec(beta=0.5))
    matmul = _matmuls((HS, HT))
    assert matmul <= est.flops <= matmul + STEPS * ELEMENTWISE * TILE
    # the two probabilities, and the log-ratio's expm1 (an exp away from 0) and log1p (which
    # XLA's cost model leaves out; _step_cost adds it)
    assert est.transcendentals == 4 * STEPS * TILE
    assert est.bytes_accessed == N * (HS + HT) * 2 + TOKEN_BLOCKS * V * (HS + HT) * 4 + 4 * N * 4


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradient_kernel_counts_one_recomputation_and_both_products(beta):
    spec = DivergenceSpec(beta=beta)
    est = pallas_tpu.grad_cost(_inputs(), R, C, 1, VOCAB_BLOCKS, spec)
    # the two projections again, h^T G and G W^T (both at the student's width)
    matmul = _matmuls((HS, HT, HS, HS))
    assert matmul <= est.flops <= matmul + STEPS * (ELEMENTWISE * TILE + HS * (R + C))
    assert GRAD_EXPS[beta] * STEPS * TILE <= est.transcendentals <= GRAD_EXPS[beta] * STEPS * TILE + STEPS * 4 * R
    per_token = N * (HS + HT) * 2 + N * 9 * 4  # hidden rows, packed per-token values and targets
    heads = V * (HS + HT) * 4
    dw = HS * V * 4
    dh = N * HS * 4
    # Hidden rows stream past once per vocabulary block; d/dh rows are written by every vocabulary
    # block and read back by all but the first.
    assert est.bytes_accessed == VOCAB_BLOCKS * per_token + heads + dw + (2 * VOCAB_BLOCKS - 1) * dh


def test_gradient_kernel_on_two_cores_counts_no_work_for_the_dead_steps():
    """3 vocabulary blocks over 2 cores: the second core's second step has no block and computes
    nothing, though its pipeline still streams the hidden rows."""
    spec = DivergenceSpec(beta=0.5)
    one = pallas_tpu.grad_cost(_inputs(), R, C, 1, 3, spec)
    two = pallas_tpu.grad_cost(_inputs(), R, C, 2, 2, spec)
    assert two.flops == one.flops and two.transcendentals == one.transcendentals
    per_token = N * (HS + HT) * 2 + N * 9 * 4
    dh = N * HS * 4
    # one more pass of the rows; each core's first block does not read d/dh back
    assert two.bytes_accessed - one.bytes_accessed == per_token - dh


def test_logits_gradient_kernel_counts_no_matmul():
    s = jax.ShapeDtypeStruct((N, V), jnp.float32)
    est = pallas_tpu.logits_grad_cost(s, s, R, C, DivergenceSpec(beta=0.0))
    assert 0 < est.flops <= STEPS * ELEMENTWISE * TILE
    assert est.transcendentals == GRAD_EXPS[0.0] * STEPS * TILE
    assert est.bytes_accessed == 3 * N * V * 4 + N * 9 * 4


def test_estimates_scale_with_the_width_as_the_matmuls_do():
    """Doubling both hidden widths doubles the matmul FLOPs and leaves the exps alone: the estimate
    follows the shapes it is given, not a constant."""
    spec = DivergenceSpec(beta=1.0)
    wide = (jax.ShapeDtypeStruct((N, 2 * HS), jnp.bfloat16), jax.ShapeDtypeStruct((2 * HS, V), jnp.float32),
            jax.ShapeDtypeStruct((N, 2 * HT), jnp.bfloat16), jax.ShapeDtypeStruct((2 * HT, V), jnp.float32))
    narrow_est, wide_est = pallas_tpu.stats_cost(_inputs(), False, R, C, spec), pallas_tpu.stats_cost(wide, False, R, C,
                                                                                                      spec)
    assert wide_est.flops - narrow_est.flops == _matmuls((HS, HT))
    assert wide_est.transcendentals == narrow_est.transcendentals


def test_vocabulary_major_heads_cost_what_hidden_major_ones_do():
    """The kernels read a head whose slice is no multiple of 128 columns as [V, H] tiles
    (pallas_tpu.vocab_major): the same products on the MXU and the same bytes, so the estimate
    must not change beyond the few integer ops of the transposed column mask (one per column)."""
    assert pallas_tpu.vocab_major(4096, 37_984) and pallas_tpu.vocab_major(HS, 1000)
    assert not pallas_tpu.vocab_major(4096, 37_888) and not pallas_tpu.vocab_major(72, 1000)
    # the stored shard decides: 2048 rows of H=4096 over fsdp=2 are aligned, 64 of H=128 are not
    assert pallas_tpu.vocab_major(4096, 75_968, 2) and not pallas_tpu.vocab_major(128, 75_968, 2)
    both = (True, True)
    for beta in (0.0, 0.5):
        spec = DivergenceSpec(beta=beta)
        pairs = [(pallas_tpu.stats_cost(_inputs(), True, R, C, spec),
                  pallas_tpu.stats_cost(_inputs(), True, R, C, spec, both)),
                 (pallas_tpu.grad_cost(_inputs(), R, C, 1, VOCAB_BLOCKS, spec),
                  pallas_tpu.grad_cost(_inputs(), R, C, 1, VOCAB_BLOCKS, spec, both))]
        if beta == 0.5:
            pairs.append((pallas_tpu.jsd_cost(_inputs(), R, C, spec), pallas_tpu.jsd_cost(_inputs(), R, C, spec, both)))
        for hidden_major, vocab_major in pairs:
            assert hidden_major.flops <= vocab_major.flops <= hidden_major.flops + STEPS * 2 * C
            assert vocab_major.transcendentals == hidden_major.transcendentals
            assert vocab_major.bytes_accessed == hidden_major.bytes_accessed
