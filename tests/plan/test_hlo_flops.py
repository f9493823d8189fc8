"""The plan's loop-aware matmul count against FLOPs known by construction: compiled CPU programs
with scanned, static, conditional and run-time-bounded loops, and TPU-style HLO text (operands
named without shapes, dots lowered to convolutions, a Mosaic call's cost estimate, a kernel's
config spanning lines as splash attention's does)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax.plan import hlo_flops


def _compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("layers", [3, 7])
def test_scanned_layers_count_every_layer(layers):
    m, k = 16, 32
    x, w = _random((m, k), 0), _random((layers, k, k), 1)

    def stack(x, w):
        with jax.named_scope("layer_stack"):
            return jax.lax.scan(lambda h, w_l: (jnp.tanh(h @ w_l), None), x, w)[0]

    counted = hlo_flops.count(_compiled_text(stack, x, w), ("layer_stack", "absent"))
    assert counted.flops == layers * 2 * m * k * k
    assert counted.by_scope == {"layer_stack": counted.flops}
    assert counted.runtime_loops == []
    # XLA's own count sees one layer
    cost = jax.jit(stack).lower(x, w).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["flops"] < 2 * (2 * m * k * k + m * k * 8)


def test_nested_static_loops_multiply_and_a_conditional_counts_its_costliest_branch():
    m, k, n = 8, 16, 24
    x, w, v = _random((m, k), 2), _random((k, k), 3), _random((k, n), 4)

    def nested(x, w, v, flag):
        def outer(_, h):
            h = jax.lax.fori_loop(0, 5, lambda _, g: jnp.sin(g @ w), h)
            return jax.lax.cond(flag > 0, lambda g: g @ w, lambda g: g, h)

        h = jax.lax.fori_loop(0, 4, outer, x)
        return h @ v

    counted = hlo_flops.count(_compiled_text(nested, x, w, v, jnp.int32(1)))
    assert counted.flops == 4 * (5 + 1) * 2 * m * k * k + 2 * m * k * n
    assert counted.runtime_loops == []


def test_a_loop_bounded_at_run_time_is_counted_once_and_named():
    m, k = 8, 16
    x, w = _random((m, k), 5), _random((k, k), 6)

    def dynamic(x, w, trips):
        with jax.named_scope("skipping_blocks"):
            return jax.lax.fori_loop(0, trips, lambda _, h: jnp.cos(h @ w), x)

    counted = hlo_flops.count(_compiled_text(dynamic, x, w, jnp.int32(9)))
    assert counted.flops == 2 * m * k * k
    assert len(counted.runtime_loops) == 1 and "skipping_blocks" in counted.runtime_loops[0]


def test_a_loop_starting_past_zero_counts_its_own_trips():
    x, w = _random((8, 16), 7), _random((16, 16), 8)
    counted = hlo_flops.count(_compiled_text(
        lambda x, w: jax.lax.fori_loop(3, 10, lambda _, h: jnp.sin(h @ w), x), x, w))
    assert counted.flops == 7 * 2 * 8 * 16 * 16


# TPU's optimized HLO names operands without their shapes, lowers dots to convolutions (one with
# batch-major output from a feature-major lhs, one windowed over padding), puts a Mosaic kernel's
# estimate in its config, and steps windowed-matmul loops by 2 (here 0, 2, .., 30: 16 trips).
_TPU_STYLE = """\
HloModule jit_step, entry_computation_layout={()->f32[]}

%body (p: (s32[], bf16[512,4096], f32[4096,1024])) -> (s32[], bf16[512,4096], f32[4096,1024]) {
  %p = (s32[]{:T(128)}, bf16[512,4096]{1,0:T(8,128)(2,1)}, f32[4096,1024]{1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %two = s32[]{:T(128)} constant(2)
  %next = s32[]{:T(128)} add(%two, %i)
  %h = bf16[512,4096]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %w = f32[4096,1024]{1,0:T(8,128)} get-tuple-element(%p), index=2
  %fusion.1 = bf16[4096,1024]{1,0:T(8,128)(2,1)} fusion(%w), kind=kLoop, calls=%convert
  %convolution.3 = f32[512,1024]{1,0:T(8,128)} convolution(%h, %fusion.1), dim_labels=bf_io->bf, metadata={op_name="jit(step)/fused_linear_divergence/while/body/dot_general"}
  %convolution.4 = f32[1024,4096]{1,0:T(8,128)} convolution(%convolution.3, %h), dim_labels=fb_io->bf, metadata={op_name="jit(step)/transpose(jvp(fused_linear_divergence))/dot_general"}
  %w3 = bf16[32,4096,1,1024]{3,2,1,0} broadcast(%fusion.1), dimensions={1,3}
  %h3 = bf16[1,512,4096,1]{3,2,1,0} reshape(%h)
  %convolution.5 = f32[512,32,1024,1]{3,2,1,0} convolution(%h3, %w3), window={size=32x1 pad=31_31x0_0 rhs_reversal=1x0}, dim_labels=0bf1_0i1o->b0f1
  %kernel = f32[512,128]{1,0} custom-call(%h), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "abc", "cost_estimate":{"flops":"1000","transcendentals":"0","bytes_accessed":"8"}}}
  %splash = f32[512,128]{1,0} custom-call(%h), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "module {
  func.func @main() {
}}, metadata={op_name="jit(step)/attention/splash_mha_fwd/pallas_call"}
  ROOT %t = (s32[]{:T(128)}, bf16[512,4096]{1,0:T(8,128)(2,1)}, f32[4096,1024]{1,0:T(8,128)}) tuple(%next, %h, %w)
}

%convert (q: f32[4096,1024]) -> bf16[4096,1024] {
  %q = f32[4096,1024]{1,0:T(8,128)} parameter(0)
  ROOT %c = bf16[4096,1024]{1,0:T(8,128)(2,1)} convert(%q)
}

%cond (p.1: (s32[], bf16[512,4096], f32[4096,1024])) -> pred[] {
  %p.1 = (s32[]{:T(128)}, bf16[512,4096]{1,0:T(8,128)(2,1)}, f32[4096,1024]{1,0:T(8,128)}) parameter(0)
  %bound = s32[]{:T(128)} constant(31)
  %i.1 = s32[]{:T(128)} get-tuple-element(%p.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%bound, %i.1), direction=GT
}

ENTRY %main (a: bf16[512,4096], b: f32[4096,1024]) -> f32[] {
  %a = bf16[512,4096]{1,0:T(8,128)(2,1)} parameter(0)
  %b = f32[4096,1024]{1,0:T(8,128)} parameter(1)
  %zero = s32[]{:T(128)} constant(0)
  %copy = s32[]{:T(128)} copy(%zero)
  %start = (s32[]{:T(128)}, bf16[512,4096]{1,0:T(8,128)(2,1)}, f32[4096,1024]{1,0:T(8,128)}) tuple(%copy, %a, %b)
  %loop = (s32[]{:T(128)}, bf16[512,4096]{1,0:T(8,128)(2,1)}, f32[4096,1024]{1,0:T(8,128)}) while(%start), condition=%cond, body=%body
  ROOT %r = f32[]{:T(128)} constant(0)
}
"""


def test_tpu_style_text_convolutions_and_mosaic_estimates():
    counted = hlo_flops.count(_TPU_STYLE, ("fused_linear_divergence",))
    forward = 2 * 512 * 1024 * 4096
    gradient = 2 * 1024 * 4096 * 512
    # the windowed one: 32 outputs along the window's dimension, each meeting the one real input
    # position once (the other 31 window positions fall on padding)
    windowed = 2 * 512 * 1024 * 4096 * 32
    assert counted.flops == 16 * (forward + gradient + windowed + 1000)
    assert counted.by_scope == {"fused_linear_divergence": 16 * (forward + gradient)}
    assert counted.runtime_loops == []
    # the kernel whose config spans lines is read whole, and the loop body goes on past it
    assert counted.opaque_kernels == ["jit(step)/attention/splash_mha_fwd/pallas_call"]


def test_text_without_an_entry_computation_is_refused():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_flops.count("HloModule empty\n")


def _kernel_without_estimate(name: str, op_name: str) -> str:
    return (f'  %{name} = f32[512,128]{{1,0}} custom-call(%a), custom_call_target="tpu_custom_call", '
            f'backend_config={{"custom_call_config": {{"body": "abc"}}}}, metadata={{op_name="{op_name}"}}\n')


def test_kernels_without_an_estimate_take_their_phase_from_an_estimate_scope():
    """Splash's three kernels inside `estimate_scope`: each counts its own phase (the backward's
    op_names wrap the scope in transpose(jvp(..))); a Mosaic call outside any scope stays opaque, and
    a scope whose phases the kernel's name does not hold gives it nothing."""
    scope = hlo_flops.estimate_scope("splash_attention", {"fwd": 40, "dq": 60, "dkv": 80})
    assert scope == "splash_attention[fwd=40,dq=60,dkv=80]"
    text = ("HloModule m, entry_computation_layout={()->f32[]}\n\nENTRY %main (a: f32[512,128]) -> f32[512,128] {\n"
            "  %a = f32[512,128]{1,0} parameter(0)\n"
            + _kernel_without_estimate("f", f"jit(step)/jvp({scope})/vmap(s)/jit(_s)/splash_mha_fwd_residuals/pallas_call")
            + _kernel_without_estimate("q", f"jit(step)/transpose(jvp({scope}))/splash_mha_dq_no_residuals/pallas_call")
            + _kernel_without_estimate("k", f"jit(step)/transpose(jvp({scope}))/splash_mha_dkv_segmented_no_residuals")
            + _kernel_without_estimate("other", f"jit(step)/{scope}/paged_attention/pallas_call")
            + _kernel_without_estimate("bare", "jit(step)/splash_mha_fwd/pallas_call")
            + "  ROOT %r = f32[512,128]{1,0} copy(%a)\n}\n")
    counted = hlo_flops.count(text, ("splash_attention[",))
    assert counted.flops == 40 + 60 + 80
    assert counted.by_scope == {"splash_attention[": 180}
    assert counted.opaque_kernels == [f"jit(step)/{scope}/paged_attention/pallas_call",
                                      "jit(step)/splash_mha_fwd/pallas_call"]


@pytest.mark.parametrize("window,tiles", [(None, 1 + 2 + 3 + 4), (200, 1 + 2 + 3 + 3)])
def test_chunked_attention_counts_the_tiles_its_mask_leaves(window, tiles):
    """Chunked attention's key-block loops are bounded at run time by the causal (and sliding)
    mask; their trips_scope makes the count the visible [128, 128] tiles: 10 of 16 causal, 9 with a
    200-token window. Per tile and unit of head width, matmul FLOPs per (query, key) pair: 4 in the
    forward (q k^T, p v), 10 in the backward (q k^T again, p^T dO, dO v^T, dS k, dS^T q); the mean
    of the values (for queries that see nothing) adds at most 2 S K D outside the loops (XLA may
    turn that product with ones into a reduction)."""
    from opsd_jax.models import attention

    batch, length, heads, kv_heads, head_dim, block = 1, 512, 2, 1, 16, 128
    q = _random((batch, length, heads, head_dim), 9)
    k, v = _random((batch, length, kv_heads, head_dim), 10), _random((batch, length, kv_heads, head_dim), 11)
    cotangent = _random((batch, length, heads, head_dim), 12)

    def forward(q, k, v):
        return attention.attend(q, k, v, sliding_window=window, implementation="chunked", block_size=block)

    def loss(q, k, v):
        return jnp.sum(forward(q, k, v) * cotangent)

    pairs = tiles * block * block * batch * heads * head_dim
    mean_values = 2 * batch * length * kv_heads * head_dim
    for program, per_pair, loops in ((forward, 4, 1), (jax.grad(loss, argnums=(0, 1, 2)), 4 + 10, 2)):
        counted = hlo_flops.count(_compiled_text(program, q, k, v))
        assert counted.runtime_loops == [] and len(counted.estimated_loops) == loops
        assert all(attention.KEY_BLOCKS_SCOPE in name for name in counted.estimated_loops)
        assert 0 <= counted.flops - per_pair * pairs <= mean_values


@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("draw", range(3))
@pytest.mark.parametrize("query_slice", [False, True])
def test_mean_key_blocks_is_what_the_key_block_ranges_visit(windowed, draw, query_slice, rng):
    """Whole sequences, and a slice of a sequence's queries (rows first_row + arange(T)) against
    all its keys, as one chip holds them in `_query_parallel_chunked`."""
    from opsd_jax.models import attention

    keys = int(rng.integers(1, 700))
    first_row = int(rng.integers(0, keys)) if query_slice else 0
    length = int(rng.integers(1, keys - first_row + 1)) if query_slice else keys
    block_q, block_k = int(rng.choice([32, 64, 128])), int(rng.choice([32, 64, 128]))
    block_q, block_k = min(block_q, length), min(block_k, keys)
    window = int(rng.integers(1, 300)) if windowed else None
    num_query_blocks, num_key_blocks = -(-length // block_q), -(-keys // block_k)
    rows = first_row + np.minimum(np.arange(num_query_blocks * block_q), length - 1)[None]
    visited = sum(int(last) - int(first) for first, last in (
        attention._key_block_range(jnp.asarray(rows), i, block_q, block_k, num_key_blocks, window)
        for i in range(num_query_blocks)))
    got = attention.mean_key_blocks(length, keys, block_q, block_k, window, self_attention=True, first_row=first_row)
    assert got == pytest.approx(visited / num_query_blocks)
    assert attention.mean_key_blocks(1, keys, 1, block_k, window, self_attention=False) == num_key_blocks
