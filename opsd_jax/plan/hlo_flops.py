"""Matmul FLOPs of a compiled XLA program with its loops multiplied out.

XLA's `cost_analysis()` counts the body of every while loop once: a model whose 36 layers are a
scan reports one layer's work, and the divergence kernel one token block's. This module reads the
compiled (per-chip, already partitioned) HLO text instead and counts what the chip runs:

- `dot`: 2 x output elements x the contracted size; `convolution` (TPU lowers most dots to one):
  2 x batch x output features x input features x the (output, window) position pairs that meet
  a real input element, padding and dilation holes excluded;
- a Pallas (Mosaic) kernel: the FLOPs of the `cost_estimate` its backend config carries; one
  without (splash attention's) takes them from an `estimate_scope` its caller wrapped it in, and
  otherwise counts 0 and is reported in `opaque_kernels`;
- `fusion`, `call` and async starts: their called computations, once;
- `while`: its body times its trip count: XLA's `known_trip_count` where it left one, else the
  loop's form `for (i = start; i < bound; i += step)` with constant start, bound and step, read
  from its condition and body; a loop whose bound is only known at run time takes the mean trip
  count a `trips_scope` its caller wrapped it in states (chunked attention's key-block loops, whose
  bounds follow the causal mask: listed in `estimated_loops`), and otherwise (the divergence
  kernel's backward remainder sweep) is counted once and reported in `runtime_loops`;
- `conditional`: its costliest branch.

Elementwise work (exponentials, the softmax's adds) is not counted: matmuls are what a step's
MFU is measured against. Every counted FLOP is also attributed to each `scopes` substring its
instruction's `op_name` holds (jax.named_scope names show there), so the divergence kernel's share
of a train step can be read off.
"""

from __future__ import annotations

import dataclasses
import math
import re

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$", re.DOTALL)
_ARRAY = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_OPCODE = re.compile(r"^([a-z][\w\-]*)\(")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations=\{([^}]*)\}|true_computation=%([\w.\-]+), "
                       r"false_computation=%([\w.\-]+))")
_ESTIMATE = re.compile(r'"cost_estimate":\{"flops":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_INDEX = re.compile(r"\bindex=(\d+)")
_DIRECTION = re.compile(r"\bdirection=(\w+)")
# Ops whose called computations are scalar reducers (no matmuls), or the other ends of an async
# pair whose start already counted the wrapped computation.
_NOT_CALLING = frozenset({"reduce", "reduce-window", "scatter", "select-and-scatter", "sort", "map", "all-reduce",
                          "all-reduce-start", "reduce-scatter", "async-update", "async-done"})
# Custom-call targets of Pallas kernels (Mosaic TPU, Triton and Mosaic GPU), whose work XLA knows
# only from the estimate they carry.
_KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SCOPED_ESTIMATE = re.compile(r"\[((?:\w+=\d+,)*\w+=\d+)\]")
_SCOPED_TRIPS = re.compile(r"\[trips=(\d+(?:\.\d+)?)\]")


def estimate_scope_prefix(name: str) -> str:
    """What every `estimate_scope(name, ...)` starts with: the `scopes` entry of `count` that
    attributes those kernels' FLOPs to `name` (and to nothing else whose op_name holds `name`)."""
    return f"{name}["


def estimate_scope(name: str, flops_by_phase: dict[str, int]) -> str:
    """A `jax.named_scope` name that hands FLOPs to the Pallas kernels called inside it that carry
    no cost estimate of their own (splash attention's are built without one and take no argument
    for it): `name[fwd=F,dq=Q,dkv=K]`. A kernel whose name holds `_phase_` (splash's
    `splash_mha_dq_no_residuals`: `_dq_`) counts that phase's FLOPs. The scope reaches the
    backward's kernels too: their op_names read `transpose(jvp(name[...]))/...`."""
    phases = ",".join(f"{phase}={int(flops)}" for phase, flops in flops_by_phase.items())
    return f"{estimate_scope_prefix(name)}{phases}]"


def scoped_estimate(op_name: str) -> float | None:
    """The FLOPs an `estimate_scope` in `op_name` gives the kernel named after it, or None."""
    for match in reversed(list(_SCOPED_ESTIMATE.finditer(op_name))):
        kernel = op_name[match.end():]
        for item in match.group(1).split(","):
            phase, flops = item.split("=")
            if re.search(rf"_{phase}(?:_|/|$)", kernel):
                return float(flops)
    return None


def trips_scope(name: str, mean_trips: float) -> str:
    """A `jax.named_scope` name for a while loop whose bound is decided at run time but whose mean
    trip count per entry its caller knows from shapes alone: `name[trips=12.5]`. Inside it such a
    loop's body counts `mean_trips` times, so a loop nested in a static one totals the sum of its
    trips over the outer loop's iterations."""
    return f"{name}[trips={mean_trips:.6f}]"


def scoped_trips(op_name: str) -> float | None:
    """The mean trip count the innermost `trips_scope` in `op_name` states, or None."""
    found = _SCOPED_TRIPS.findall(op_name)
    return float(found[-1]) if found else None


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str
    is_root: bool = False


@dataclasses.dataclass
class Count:
    """FLOPs per chip; `by_scope[s]`: those whose op_name holds s; `runtime_loops`: the op_names
    of the while loops counted once because their trip count is decided at run time (a loop
    inside another is listed once); `estimated_loops`: those counted at their `trips_scope`'s mean."""

    flops: float = 0.0
    by_scope: dict[str, float] = dataclasses.field(default_factory=dict)
    runtime_loops: list[str] = dataclasses.field(default_factory=list)
    estimated_loops: list[str] = dataclasses.field(default_factory=list)
    # op_names of Pallas kernels that carry no cost estimate and sit in no estimate_scope: counted 0
    opaque_kernels: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: Count, times: float = 1.0) -> None:
        self.flops += times * other.flops
        for scope, flops in other.by_scope.items():
            self.by_scope[scope] = self.by_scope.get(scope, 0.0) + times * flops
        self.runtime_loops += [name for name in other.runtime_loops if name not in self.runtime_loops]
        self.estimated_loops += [name for name in other.estimated_loops if name not in self.estimated_loops]
        self.opaque_kernels += [name for name in other.opaque_kernels if name not in self.opaque_kernels]


def _matching_paren(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced parentheses in HLO: {text[start:start + 120]!r}")


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def parse_instruction(line: str) -> Instruction | None:
    """One HLO instruction line, or None for anything else (headers, braces, comments)."""
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    root, name, rest = match.groups()
    if rest.startswith("("):
        end = _matching_paren(rest, 0)
        shape, rest = rest[: end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode = _OPCODE.match(rest)
    if not opcode:
        return None
    open_at = opcode.end() - 1
    close_at = _matching_paren(rest, open_at)
    operands = tuple(part.split()[-1].lstrip("%") for part in _split_top_level(rest[open_at + 1: close_at]) if part)
    opcode = opcode.group(1)
    attributes = rest[close_at + 1:]
    if opcode == "constant":
        # A constant's value is its "operand": `constant(16)`.
        attributes = rest[open_at + 1: close_at] + attributes
        operands = ()
    return Instruction(name, shape, opcode, operands, attributes, bool(root))


def parse_module(text: str) -> tuple[dict[str, dict[str, Instruction]], str]:
    """({computation: {instruction name: Instruction}} in order, the entry computation's name).
    An instruction may span lines (a Mosaic call's backend config holds its kernel's text); a
    computation ends at a line that is only a closing brace."""
    computations: dict[str, dict[str, Instruction]] = {}
    entry, current, pending = None, None, []

    def flush():
        if current is not None and pending:
            instruction = parse_instruction("\n".join(pending))
            if instruction is not None:
                current[instruction.name] = instruction
        pending.clear()

    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and line.rstrip().endswith("{"):
            flush()
            current = computations.setdefault(header.group(1), {})
            if line.startswith("ENTRY"):
                entry = header.group(1)
        elif line.rstrip() == "}":
            flush()
            current = None
        elif _INSTRUCTION.match(line):
            flush()
            pending.append(line)
        elif pending:
            pending.append(line)
    flush()
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _dims(shape: str) -> list[int]:
    match = _ARRAY.search(shape)
    if not match:
        raise ValueError(f"not an array shape: {shape!r}")
    return [int(d) for d in match.group(2).split(",") if d]


def _attribute(attributes: str, key: str) -> str | None:
    match = re.search(rf"\b{key}=([^\s,]+(?:,\d+)*)", attributes)
    return match.group(1) if match else None


def _contracting(attributes: str, side: str) -> list[int]:
    match = re.search(rf"\b{side}_contracting_dims=\{{([\d,]*)\}}", attributes)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def _window_pairs(out_size: int, in_size: int, size: int, stride: int, low: int, lhs_dilate: int,
                  rhs_dilate: int) -> int:
    """(output position, window position) pairs of one spatial dimension that land on an input
    element rather than padding or a dilation hole: the multiply-adds that dimension contributes."""
    pairs = 0
    for o in range(out_size):
        if lhs_dilate == 1:
            # input index o*stride + w*rhs_dilate - low in [0, in_size)
            first = max(0, -(-(low - o * stride) // rhs_dilate))
            last = min(size - 1, (in_size - 1 + low - o * stride) // rhs_dilate)
            pairs += max(0, last - first + 1)
        else:
            for w in range(size):
                p = o * stride + w * rhs_dilate - low
                pairs += p >= 0 and p % lhs_dilate == 0 and p // lhs_dilate < in_size
    return pairs


def _window(attributes: str) -> dict[str, list[int]]:
    """`window={size=32x4 stride=.. pad=31_31x0_0 lhs_dilate=.. rhs_dilate=..}` as lists per
    spatial dimension (pad as its low sides)."""
    match = re.search(r"\bwindow=\{([^}]*)\}", attributes)
    fields = dict(item.split("=", 1) for item in match.group(1).split()) if match else {}
    size = [int(v) for v in fields["size"].split("x")] if "size" in fields else []

    def per_dim(key, default):
        return [int(v) for v in fields[key].split("x")] if key in fields else [default] * len(size)

    low = [int(v.split("_")[0]) for v in fields["pad"].split("x")] if "pad" in fields else [0] * len(size)
    return {"size": size, "stride": per_dim("stride", 1), "low": low, "lhs_dilate": per_dim("lhs_dilate", 1),
            "rhs_dilate": per_dim("rhs_dilate", 1)}


def _convolution_flops(instruction: Instruction, shapes: dict[str, Instruction]) -> float:
    """2 x batch x output features x input features per group x the valid (output, window)
    position pairs of every spatial dimension. TPU lowers dots to convolutions, some of them
    windowed with wide padding (a weight gradient as a 32-wide window over one real position), so
    counting every window position, padding included, would overcount many times."""
    labels = _attribute(instruction.attributes, "dim_labels")
    if labels is None:
        raise ValueError(f"convolution {instruction.name} has no dim_labels")
    lhs_labels, rest = labels.split("_")
    kernel_labels, out_labels = rest.split("->")
    lhs = _dims(shapes[instruction.operands[0]].shape)
    kernel = _dims(shapes[instruction.operands[1]].shape)
    out = _dims(instruction.shape)
    window = _window(instruction.attributes)
    flops = 2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] * kernel[kernel_labels.index("i")]
    for d, size in enumerate(window["size"]):
        label = str(d)
        flops *= _window_pairs(out[out_labels.index(label)], lhs[lhs_labels.index(label)], size,
                               window["stride"][d], window["low"][d], window["lhs_dilate"][d],
                               window["rhs_dilate"][d])
    return flops


def _is_pallas_call(instruction: Instruction) -> bool:
    return instruction.opcode == "custom-call" and any(
        f'custom_call_target="{t}"' in instruction.attributes for t in _KERNEL_TARGETS)


def instruction_flops(instruction: Instruction, shapes: dict[str, Instruction]) -> float:
    """FLOPs of one dot, convolution or cost-estimated Pallas call; 0 for anything else."""
    if instruction.opcode == "dot":
        lhs = _dims(shapes[instruction.operands[0]].shape)
        contracted = math.prod(lhs[d] for d in _contracting(instruction.attributes, "lhs"))
        return 2.0 * math.prod(_dims(instruction.shape)) * contracted
    if instruction.opcode == "convolution":
        return _convolution_flops(instruction, shapes)
    if instruction.opcode == "custom-call":
        estimate = _ESTIMATE.search(instruction.attributes)
        if estimate:
            return float(estimate.group(1))
        op_name = _OP_NAME.search(instruction.attributes)
        scoped = scoped_estimate(op_name.group(1)) if op_name and _is_pallas_call(instruction) else None
        return scoped or 0.0
    return 0.0


def _through_copies(name: str, shapes: dict[str, Instruction]) -> Instruction | None:
    instruction = shapes.get(name)
    while instruction is not None and instruction.opcode in ("copy", "bitcast") and instruction.operands:
        instruction = shapes.get(instruction.operands[0])
    return instruction


def _constant(instruction: Instruction | None) -> int | None:
    if instruction is None or instruction.opcode != "constant":
        return None
    value = re.match(r"\s*(-?\d+)\s*(?:,|$)", instruction.attributes)
    return int(value.group(1)) if value else None


def _root(computation: dict[str, Instruction]) -> Instruction | None:
    return next((i for i in computation.values() if i.is_root), None)


def _called(loop: Instruction, role: str) -> str:
    """The name of a while loop's `body` or `condition` computation."""
    return re.search(rf"\b{role}=%([\w.\-]+)", loop.attributes).group(1)


def _unfused(instruction: Instruction | None, computations: dict) -> tuple[Instruction | None, tuple[str, ...]]:
    """(the op, its operands in the caller's names): for a fusion that wraps one op of its
    parameters (the CPU wraps a loop's compare and add so), that op; else the instruction."""
    if instruction is None or instruction.opcode != "fusion":
        return instruction, instruction.operands if instruction is not None else ()
    fused = computations.get(_CALLED.search(instruction.attributes).group(1), {})
    inner = _root(fused)
    parameters = {i.name: int(i.operands[0]) for i in fused.values() if i.opcode == "parameter"}
    if inner is None or not all(o in parameters for o in inner.operands):
        return instruction, instruction.operands
    return inner, tuple(instruction.operands[parameters[o]] for o in inner.operands)


def _element(instruction: Instruction | None, index: int) -> bool:
    """Whether `instruction` is get-tuple-element `index` (of the loop's parameter)."""
    found = instruction is not None and instruction.opcode == "get-tuple-element" and _INDEX.search(
        instruction.attributes)
    return bool(found) and int(found.group(1)) == index


def trip_count(loop: Instruction, computations: dict, shapes: dict[str, Instruction]) -> int | None:
    """The trip count of a while loop: from XLA's own annotation where it left one, else from the
    loop's form `for (i = start; i < bound; i += step)` with start, bound and step constants (the
    condition `i < C` or `C > i`; XLA's windowed matmuls step by 2). None when any of them is
    decided at run time."""
    known = _KNOWN_TRIPS.search(loop.attributes)
    if known:
        return int(known.group(1))
    condition = computations[_called(loop, "condition")]
    compare, operands = _unfused(_root(condition), computations)
    if compare is None or compare.opcode != "compare" or len(operands) != 2:
        return None
    direction = _DIRECTION.search(compare.attributes)
    direction = direction.group(1) if direction else ""
    left, right = (_through_copies(o, condition) for o in operands)
    if direction == "GT":
        left, right, direction = right, left, "LT"
    if direction != "LT" or left is None or left.opcode != "get-tuple-element":
        return None
    index = int(_INDEX.search(left.attributes).group(1))
    bound = _constant(right)
    start_tuple = _through_copies(loop.operands[0], shapes)
    if bound is None or start_tuple is None or start_tuple.opcode != "tuple":
        return None
    start = _constant(_through_copies(start_tuple.operands[index], shapes))
    body = computations[_called(loop, "body")]
    body_root = _root(body)
    if start is None or body_root is None or body_root.opcode != "tuple":
        return None
    add, operands = _unfused(_through_copies(body_root.operands[index], body), computations)
    if add is None or add.opcode != "add" or len(operands) != 2:
        return None
    first, second = (_through_copies(o, body) for o in operands)
    step = _constant(second) if _element(first, index) else _constant(first) if _element(second, index) else None
    if not step or step < 0:
        return None
    return max(0, -(-(bound - start) // step))


def count(text: str, scopes: tuple[str, ...] = ()) -> Count:
    """Loop-aware matmul FLOPs of the compiled HLO `text` (one chip's module)."""
    computations, entry = parse_module(text)
    memo: dict[str, Count] = {}

    def of(name: str) -> Count:
        if name in memo:
            return memo[name]
        memo[name] = Count()  # a recursion guard; HLO has no recursion
        instructions = computations[name]
        total = Count()
        for instruction in instructions.values():
            flops = instruction_flops(instruction, instructions)
            op_name = _OP_NAME.search(instruction.attributes)
            op_name = op_name.group(1) if op_name else instruction.name
            if _is_pallas_call(instruction) and not flops and op_name not in total.opaque_kernels:
                total.opaque_kernels.append(op_name)
            if flops:
                total.flops += flops
                for scope in scopes:
                    if scope in op_name:
                        total.by_scope[scope] = total.by_scope.get(scope, 0.0) + flops
            if instruction.opcode == "while":
                body = _called(instruction, "body")
                trips = trip_count(instruction, computations, instructions)
                if trips is None:
                    trips = scoped_trips(op_name)
                    listed = total.runtime_loops if trips is None else total.estimated_loops
                    if op_name not in listed:
                        listed.append(op_name)
                total.add(of(body), 1 if trips is None else trips)
                continue
            if instruction.opcode == "conditional":
                branches = _BRANCHES.search(instruction.attributes)
                names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches.group(1)
                         else [branches.group(2), branches.group(3)])
                total.add(max((of(b) for b in names), key=lambda c: c.flops))
                continue
            if instruction.opcode in _NOT_CALLING:
                continue
            for called in _CALLED.findall(instruction.attributes):
                if called in computations:
                    total.add(of(called))
        memo[name] = total
        return total

    return of(entry)
