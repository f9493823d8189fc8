"""VMEM budgets per TPU generation, and the pallas_tpu divergence kernels' block sizes under them.

Letters: N tokens, V vocabulary columns (of this shard), Hs / Ht student / teacher hidden widths,
R rows per token block, C columns per vocabulary block.

Pallas double-buffers every block it streams, so a kernel's VMEM is about twice its blocks plus
the values it keeps live. At Qwen3-8B widths (H=4096) with a float32 master head, one [H, C]
head tile is 8 MiB at C=512, and the gradient kernel holds six head-sized blocks or values
(student and teacher tiles twice each, their MXU casts, the [Hs, C] d/dW block twice): that is
what overflowed v5e's 64 MiB scoped limit (70.4M) before. Block sizes are therefore chosen per
kernel, per width and per generation: the candidates that fit the budget, and among them the one
that moves the least HBM.
"""

from __future__ import annotations

import math
from typing import NamedTuple

MiB = 2**20

# VMEM per TensorCore (what one kernel instance can address), as jax's Pallas `tpu_info` lists
# it: v4 16 MiB, v5e 128 MiB, v5p 64 MiB, v6e 128 MiB, v7x 64 MiB.
PHYSICAL_VMEM = {"v4": 16 * MiB, "v5e": 128 * MiB, "v5p": 64 * MiB, "v6e": 128 * MiB, "v7x": 64 * MiB}
# When the chip is unknown (interpreting on a CPU, or compiling without a device): the smallest
# current generation's VMEM, so a kernel that fits here fits on v5e, v5p, v6e and v7x.
DEFAULT_GENERATION = "v5p"
# Generations whose two TensorCores form one jax device ("megacore", jax's tpu_info
# supports_megacore): a "parallel" grid axis is split between them. v7x has two cores per chip
# too, but each is its own device.
MEGACORE = ("v4", "v5p")


def cores_per_device(generation: str | None) -> int:
    """TensorCores behind one device of `generation` (1 when unknown: interpreting, or a kernel
    that must not assume a split)."""
    return 2 if generation in MEGACORE else 1


class Budget(NamedTuple):
    """limit_bytes: the scoped VMEM limit requested from Mosaic. block_bytes: what `estimate`
    may reach for the blocks we pick (below the limit: the estimate ignores Mosaic's own scratch
    and short-lived temporaries; the H=4096 AOT test checks the real figures)."""

    limit_bytes: int
    block_bytes: int


def budget(generation: str | None) -> Budget:
    """The VMEM budget of `generation` (a PHYSICAL_VMEM key; None: DEFAULT_GENERATION).

    The limit is 3/4 of the core: raising it to all of VMEM leaves Mosaic no room for internal
    scratch (relayouts, spills), and a kernel that needs that much has blocks too large anyway.
    Blocks get 7/8 of the limit for the estimate's error.
    """
    physical = PHYSICAL_VMEM[generation or DEFAULT_GENERATION]
    limit = physical * 3 // 4
    return Budget(limit, limit * 7 // 8)


def generation_of(device_kind: str) -> str | None:
    """The PHYSICAL_VMEM key of a jax device_kind ("TPU v5 lite" -> "v5e", "TPU v5" -> "v5p",
    "TPU v6 lite" -> "v6e", "TPU7x" -> "v7x"), None when it is no TPU we know."""
    kind = device_kind.lower().replace(" ", "")
    if not kind.startswith("tpu"):
        return None
    kind = kind[3:]
    if kind.startswith(("v5lite", "v5e")):
        return "v5e"
    if kind.startswith(("v6lite", "v6e")):
        return "v6e"
    if kind.startswith(("v5p", "v5")):
        return "v5p"
    if kind.startswith("v4"):
        return "v4"
    if kind.startswith(("7x", "v7")):
        return "v7x"
    return None


class Operands(NamedTuple):
    """What a kernel reads. projected: hidden states and heads (widths and itemsizes); else two
    [N, V] logits arrays of itemsize logits_bytes."""

    projected: bool
    student_width: int = 0
    teacher_width: int = 0
    student_hidden_bytes: int = 0
    teacher_hidden_bytes: int = 0
    student_head_bytes: int = 0
    teacher_head_bytes: int = 0
    logits_bytes: int = 4


# Blocks streamed besides the matrices, in units of an [R, 1] vector block, and what the kernel
# writes (see `estimate`).
KERNELS = ("stats", "jsd", "logits_grad", "grad")
_LANES = 128
_LIVE_TILES = 8  # float32 [R, C] values alive at once: two logits tiles, probabilities, mixture, gradient, masks


def estimate(kernel: str, r: int, c: int, ops: Operands) -> int:
    """Estimated VMEM bytes of one pallas_call with (R, C) blocks.

    An [R, k] 32-bit block with k <= 128 fills R/8 whole (8, 128) tiles, so a per-token vector
    costs R * 128 * 4 bytes, not R * 4. Blocks whose index changes only along the outer grid axis
    are single-buffered (pl.Buffered(1): one stall per outer step): the hidden rows of the
    statistics kernels, the head tiles and the d/dW block of the gradient kernel.
    """
    vec = r * _LANES * 4
    tile = r * c * 4
    single = 0
    if ops.projected:
        rows_bytes = r * (ops.student_width * ops.student_hidden_bytes + ops.teacher_width * ops.teacher_hidden_bytes)
        head_bytes = c * (ops.student_width * ops.student_head_bytes + ops.teacher_width * ops.teacher_head_bytes)
        double, single = (rows_bytes, head_bytes) if kernel == "grad" else (head_bytes, rows_bytes)
        # Head tiles cast to the hidden states' dtype for the MXU.
        live = c * (ops.student_width * ops.student_hidden_bytes + ops.teacher_width * ops.teacher_hidden_bytes)
    else:
        double = 2 * r * c * ops.logits_bytes
        live = 0
    live += _LIVE_TILES * tile
    if kernel == "stats":
        double += vec + 10 * vec  # targets; eight running statistics and two target logits written
    elif kernel == "jsd":
        double += 4 * vec
    elif kernel == "logits_grad":
        double += 2 * vec + r * c * ops.logits_bytes  # packed per-token values, targets; the gradient
    elif kernel == "grad":
        double += 2 * vec
        single += ops.student_width * c * 4  # the d/dW block
        # Two [R, Hs] float32 d/dh buffers (scratch); the head tile with its tail zeroed, the
        # hidden rows with ignored ones zeroed, G W^T.
        live += 2 * r * ops.student_width * 4
        live += (c + r) * ops.student_width * ops.student_hidden_bytes + r * ops.student_width * 4
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return 2 * double + single + live


def hbm_bytes(kernel: str, r: int, c: int, n: int, vocab: int, ops: Operands) -> int:
    """Bytes one pallas_call moves through HBM: the operand whose block changes along the inner
    grid axis is read once per outer block (heads per token block; for the gradient kernel,
    whose outer axis is the vocabulary, hidden states per vocabulary block, plus the float32
    d/dh rows read and written back once per vocabulary block)."""
    if not ops.projected:
        return 2 * n * vocab * ops.logits_bytes
    rows_bytes = n * (ops.student_width * ops.student_hidden_bytes + ops.teacher_width * ops.teacher_hidden_bytes)
    head_bytes = vocab * (ops.student_width * ops.student_head_bytes + ops.teacher_width * ops.teacher_head_bytes)
    if kernel == "grad":
        return math.ceil(vocab / c) * (rows_bytes + 2 * n * ops.student_width * 4) + head_bytes
    return math.ceil(n / r) * head_bytes + rows_bytes


ROW_CANDIDATES = (1024, 512, 256, 128, 64, 32, 16, 8)
COLUMN_CANDIDATES = (2048, 1024, 512, 256, 128)


def _legal(size: int, total: int, unit: int) -> int:
    """A block size Mosaic accepts: the whole dimension, or a multiple of `unit`."""
    return total if size >= total else max(unit, size // unit * unit)


def choose_blocks(kernel: str, n: int, vocab: int, ops: Operands, generation: str | None,
                  token_block: int | None = None, vocab_block: int | None = None) -> tuple[int, int]:
    """(R, C) for `kernel`: R a multiple of 8 or N, C a multiple of 128 or V. Explicit
    token_block / vocab_block are kept (rounded to what Mosaic accepts); otherwise the fitting
    candidate with the least HBM traffic, then the fewest grid steps.

    Raises ValueError when even the smallest blocks exceed the budget (a width too large for
    this generation's VMEM with these dtypes).
    """
    rows_ = (token_block,) if token_block else ROW_CANDIDATES
    cols = (vocab_block,) if vocab_block else COLUMN_CANDIDATES
    pairs = sorted({(_legal(r, n, 8), _legal(c, vocab, 128)) for r in rows_ for c in cols})
    if token_block and vocab_block:
        return pairs[0]
    limit = budget(generation).block_bytes
    fitting = [(r, c) for r, c in pairs if estimate(kernel, r, c, ops) <= limit]
    if not fitting:
        r, c = pairs[0]
        raise ValueError(
            f"pallas_tpu {kernel}: even {r}x{c} blocks need ~{estimate(kernel, r, c, ops) / MiB:.1f} MiB of VMEM, "
            f"over the {limit / MiB:.1f} MiB budget of {generation or DEFAULT_GENERATION} (hidden widths "
            f"{ops.student_width}/{ops.teacher_width}); use impl='xla' or bfloat16 heads"
        )
    # Blocks of at least 256 first where they fit: smaller ones leave v6e's and v7x's 256-wide
    # MXUs half idle and pay the per-step overhead more often; then at least 128 (one MXU pass
    # of rows on v4 / v5); only then anything that fits.
    for least in (256, 128, 0):
        tier = [(r, c) for r, c in fitting if r >= min(least, n) and c >= min(least, vocab)]
        if tier:
            break
    return min(tier, key=lambda rc: (hbm_bytes(kernel, rc[0], rc[1], n, vocab, ops),
                                     math.ceil(n / rc[0]) * math.ceil(vocab / rc[1])))


# Head orientation. The model's heads are [H, V]; a vocabulary-parallel shard gets [H, v], gathered
# at the shard_map boundary from the stored [H / f, v] shards when fsdp (f) splits the hidden
# dimension. XLA's TPU layouts avoid padding the minor dimension to 128 lanes: when v is no
# multiple of 128 but H / f is (Qwen3: 151,936 / 2, 4 or 8 columns; H = 2048-4096), the stored
# shard, and the head gathered from it, are column-major ({0,1}, hidden minor), and so is d/dW.
# Mosaic reads its operands row-major, so an [H, v] kernel operand made XLA copy both heads in and
# d/dW out (3 x 622 MB at H=4096, v=37,984: BUILD_NOTES); the XLA kernel's row-major [H, v] d/dW
# accumulator cost the one copy out. Such a head is therefore read as its transpose [v, H], which
# in row-major *is* that column-major buffer (the transpose is a bitcast), and d/dW is formed
# [v, H] the same way. A 128-aligned slice is row-major already and keeps [H, C] tiles; so does a
# shard whose hidden rows are not 128-aligned (a 64-row shard of H=128 over fsdp=2: XLA pads
# 75,968 columns to 76,032 rather than 64 rows to 128 and stores it row-major). With neither
# aligned XLA pads one of them either way and [H, v] is kept. The rule is per head: student and
# teacher widths may differ.
_LANE = 128


def vocab_major(width: int, vocab: int, hidden_shards: int = 1) -> bool:
    """Whether a TPU kernel reads an [H, v] head as its transpose [v, H] and forms d/dW as [v, H]
    (see the note above); hidden_shards: the stored head's fsdp split of H
    (DivergenceSpec.head_hidden_shards)."""
    stored = width // hidden_shards if width % hidden_shards == 0 else width
    return vocab % _LANE != 0 and stored % _LANE == 0
