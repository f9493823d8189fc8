"""Typed run configs: dataclasses, read from YAML, with dotted command-line overrides.

Every key is checked: an unknown or mistyped key is an error that names it and lists the valid
keys of its section; a value of the wrong type or outside its allowed set names the key too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal

import yaml

from opsd_jax.paths import optional_user_path


class ConfigKeyError(ValueError):
    """An unknown key or a bad value in a run config; the message names the dotted key."""


@dataclasses.dataclass
class ModelSection:
    checkpoint: str = ""  # HF folder or opsd-jax Orbax checkpoint of the student
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    remat: bool = True
    # full: recompute each layer in the backward pass; dots: keep its matmul outputs; offload:
    # keep them in host memory.
    remat_policy: Literal["full", "dots", "offload"] = "full"
    # true: the layers are one scan (compile time flat in depth); false: unrolled over the same
    # parameters (more compile time; on TPU less memory for OLMo-3's dense step).
    scan_layers: bool = True
    # auto: cuDNN flash attention on GPU where it applies, splash on TPU under a mesh where it
    # applies, else chunked (online softmax, O(T x block) memory); dense materializes the scores
    # (the oracle).
    attention: Literal["auto", "dense", "chunked", "cudnn", "splash"] = "auto"
    attention_block_size: int = 512

    def runtime(self, *, training: bool) -> dict:
        """The ModelConfig fields this section sets (the student's when `training`, else a
        teacher's: no remat, it takes no gradient)."""
        fields = {"compute_dtype": self.compute_dtype, "attention_implementation": self.attention,
                  "attention_block_size": self.attention_block_size, "scan_layers": self.scan_layers}
        return {**fields, "remat": self.remat, "remat_policy": self.remat_policy} if training else fields


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass
class TeacherSection:
    # frozen: the initial student weights (OPSD default); ema: an exponential moving average of
    # the student; live: the current student weights; external: another checkpoint (OPD).
    kind: Literal["frozen", "ema", "live", "external"] = "frozen"
    checkpoint: str | None = None  # for kind=external; must share the student's tokenizer
    ema_rate: float = 0.99

    def param_dtype(self, model: ModelSection) -> str:
        """The dtype the step keeps this teacher's parameters in. A frozen or external teacher only
        runs forward passes, and the decoder casts every parameter to compute_dtype before use,
        so storing it in compute_dtype where that is the narrower loses nothing there and halves
        its memory (the hub's checkpoints are bfloat16, so a frozen copy of one is even exact);
        its output head then reaches the divergence kernel in the dtype the MXU reads anyway. An
        EMA teacher keeps param_dtype: its updates are smaller than compute_dtype's rounding."""
        if self.kind == "ema" or _DTYPE_BYTES[model.compute_dtype] >= _DTYPE_BYTES[model.param_dtype]:
            return model.param_dtype
        return model.compute_dtype


@dataclasses.dataclass
class DataSection:
    path: str = ""
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = "auto"
    preset: Literal["none", "math", "openthoughts", "countdown"] = "none"  # fills column names
    problem_column: str = "problem"
    solution_column: str = "solution"
    answer_column: str = "answer"
    split: str | None = None  # for a saved DatasetDict
    shuffle_seed: int = 0
    # shuffle: grain's per-host shuffle, reshuffled every epoch. paper: the paper trainer's order
    # (the `datasets` shuffle, then TRL's sampler permutation, both seeded with shuffle_seed; 42 in
    # the paper), so step k trains on the paper's step-k prompts (`data.sources.paper_order`). It
    # orders the problems the run keeps: the file's rows unless `overlong: skip` drops some.
    order: Literal["shuffle", "paper"] = "shuffle"
    max_prompt_tokens: int = 1024  # student or teacher prompt; longer ones are handled per `overlong`
    # skip: drop the problem (counted in the metrics); error: stop naming it; truncate_left: keep the
    # last max_prompt_tokens ids of the templated prompt, as the paper's trainer does.
    overlong: Literal["skip", "error", "truncate_left"] = "skip"
    # A row whose solution or answer, where the run reads it, is empty. error: stop naming it;
    # keep: train on it with an empty privileged context, as the paper's trainer does (the paper's
    # Countdown builder writes an empty response_suffix for a response without </think>).
    empty_context: Literal["error", "keep"] = "error"


@dataclasses.dataclass
class PromptSection:
    # dense: the full worked solution; sparse: only the final answer; fraction: the first
    # `fraction` of the solution's tokens; none: vanilla OPD (teacher sees the student prompt);
    # instruction: the teacher gets `instruction` and no solution (the "concise" control).
    privilege: Literal["dense", "sparse", "fraction", "none", "instruction"] = "dense"
    fraction: float = 0.5
    student_suffix: str = "Return your final response within \\boxed{}."
    # How the suffix joins the problem. paragraph: "{problem}\n\n{suffix}"; paper: the paper's data
    # builder rule, a problem already ending with the suffix is kept as it is, any other becomes
    # "{problem, right-stripped} {suffix}" (and with no suffix the problem is used verbatim).
    suffix_join: Literal["paragraph", "paper"] = "paragraph"
    teacher_template: str = (
        "{prompt}\n\nThis is an example for a response to the question:\n{privileged}\n\n"
        "Now answer with a response of your own, including the thinking process."
    )
    # privilege=instruction: the teacher's whole prompt; {prompt} is the student's prompt text.
    instruction: str = "{prompt}\n\nBe concise: answer with as little reasoning as needed."
    student_thinking: bool = True
    teacher_thinking: bool = True


@dataclasses.dataclass
class SamplingSection:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    max_new_tokens: int = 4096
    max_slots: int = 64
    # The rollout sampler's KV page pool as a share of every slot at full length (prompt +
    # max_new_tokens): below 1 it stays smaller beside the training state, and when it runs dry
    # sequences are preempted and resumed (same tokens, more prefill). Rows per page:
    kv_cache_fraction: float = 1.0
    kv_page_size: int = 16


@dataclasses.dataclass
class ObjectiveSection:
    # jsd / forward_kl / reverse_kl: full-vocabulary divergences through the fused kernel;
    # sampled_reverse_kl: policy gradient with advantage log p_T(y) - log p_S(y) on sampled tokens;
    # topk: the divergence (with `beta`) over the teacher's top `teacher_top_k` tokens + a tail bucket.
    # sft: teacher-forced cross entropy on the data's solution column as the response (no sampler, no
    #   teacher): the warm start of the toy world, through the same step.
    kind: Literal["jsd", "forward_kl", "reverse_kl", "sampled_reverse_kl", "topk", "sft"] = "jsd"
    teacher_top_k: int = 64
    beta: float = 0.5  # JSD mixture weight (TRL/GKD convention)
    temperature: float = 1.0
    skip_first: int = 3  # completion tokens excluded at the start
    window: int | None = None  # only the first/last `window` completion tokens count
    window_from: Literal["first", "last"] = "first"
    # The per-sequence importance weight multiplying every token's divergence, from the ratios
    # r_t = exp(logp_train - logp_sampler) over the sequence's loss tokens (see BUILD_NOTES):
    # paper: the sampler's processed log-probs (after temperature / top-k / top-p), each r_t capped
    #   at importance_cap, then averaged (the paper's trainer: vLLM processed log-probs, clamp 2.0);
    # sequence: the sampler's raw model log-probs, averaged, then the mean capped (measures only the
    #   sampler / trainer numerical mismatch and stale weights, not the top-k filter).
    importance: Literal["paper", "sequence"] = "paper"
    importance_cap: float | None = 2.0
    reduction: Literal["sequence_mean", "token_mean"] = "sequence_mean"
    token_weighting: Literal["none", "top_student_entropy", "downweight_teacher_at_forks"] = "none"
    top_rho: float = 0.2  # share of highest student-entropy tokens kept / treated as forks
    # The teacher context at fork tokens (the top_rho share by student entropy): privileged (the
    # teacher prompt, as everywhere else) or vanilla (the teacher model on the student's own
    # prompt, one more teacher forward): a fix to try where the privileged teacher reshapes the
    # student at its forks, while it still teaches everywhere else.
    fork_teacher: Literal["privileged", "vanilla"] = "privileged"
    fork_weight: float = 0.5  # weight of fork positions for downweight_teacher_at_forks
    discount: float = 1.0  # sampled_reverse_kl: advantage summed over future tokens with this discount


@dataclasses.dataclass
class OptimizerSection:
    learning_rate: float = 5e-6
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999


@dataclasses.dataclass
class TrainSection:
    output_dir: str = "runs/opsd"
    steps: int = 100
    batch_size: int = 64  # prompts per step, all hosts together (one rollout each)
    microbatches: int = 1  # gradient accumulation
    seed: int = 0
    # data,fsdp,tensor sizes (one may be -1: the devices left), per slice on a multi-slice job; or
    # auto: chosen from the model, the batch and the devices (parallel.auto_mesh_shape).
    mesh: str = "1,-1,1"
    # On a host without accelerators, emulate this many CPU devices so `mesh` fits a laptop.
    # `opsd-jax train` applies it before jax starts; it never hides a TPU or GPU.
    cpu_devices: int | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 1
    # Write the step's rollouts (opsd-jax-rollouts/1, read by `opsd-jax analyze`) every N steps; 0: never.
    save_rollouts_every: int = 0
    # After a preemption (SIGTERM) every process saves at the same step and exits with this code,
    # which the GKE JobSet / XPK failure policy restarts on (42 and 127-255); 0 would end the job.
    preemption_exit_code: int = 42
    # The fused divergence kernel: auto (xla), xla, pallas_tpu, pallas_gpu or reference. On TPU,
    # xla sweeps once (8 N H V, gradients formed for the loss's weights after a student pass of
    # 2 N H V) where pallas_tpu computes statistics first and recomputes (12 N H V for the KLs, 16
    # for the JSD) with VMEM-resident head-gradient blocks; `opsd-jax plan` counts both in the real
    # step, but which is faster has not been measured on a TPU (BUILD_NOTES, issue 12).
    kernel: Literal["auto", "xla", "pallas_tpu", "pallas_gpu", "reference"] = "auto"

    def __post_init__(self):
        self.mesh = check_mesh(self.mesh, "train.mesh")


def mesh_sizes(text) -> tuple[int, int, int] | None:
    """Three sizes data,fsdp,tensor from "2,2,2" or "1,-1,1" (each a positive integer or -1, at
    most one -1), or None for "auto"; anything else is a ValueError. The one parser of mesh
    settings, for configs and command lines alike (here, not in parallel.py: reading a config
    imports no jax)."""
    if not isinstance(text, str):
        raise ValueError(f"expected 'auto' or sizes data,fsdp,tensor such as 1,-1,1; got {text!r}")
    if text.strip().lower() == "auto":
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(parts) != 3 or len(sizes) != 3 or any(s < 1 and s != -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"{text!r} is neither 'auto' nor three sizes data,fsdp,tensor (each a positive integer, "
                         "or -1 for the devices left, at most one -1), e.g. 1,-1,1")
    return tuple(sizes)  # type: ignore[return-value]


def check_mesh(text: str, key: str) -> str:
    """A mesh setting as written ("auto" in any case or spacing is stored as "auto"; sizes as
    `mesh_sizes` accepts them); anything else is a ConfigKeyError naming `key`, when the config
    is read rather than once devices exist."""
    try:
        sizes = mesh_sizes(text)
    except ValueError as error:
        raise ConfigKeyError(f"{key}: {error}") from None
    return "auto" if sizes is None else text


@dataclasses.dataclass
class EvalSection:
    """How `opsd-jax eval --config RUN.yaml` evaluates this run's checkpoints (flags override)."""

    suites: str = "aime24,aime25,hmmt25"  # built-in names or suite files, comma-separated
    n: int = 16  # samples per problem
    max_tokens: int = 38912
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0  # 0: off
    budgets: str = "4096,8192,16384,32768"  # regraded by cutting each generation
    grading: str = "strict"  # strict, paper, or both ("strict,paper"); see opsd_jax/eval/score.py
    thinking: bool | None = None  # None: the chat template's default, as the paper evaluates
    instruction: str | None = None  # text appended to each problem (the paper appends none)


@dataclasses.dataclass
class RunConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    teacher: TeacherSection = dataclasses.field(default_factory=TeacherSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    prompt: PromptSection = dataclasses.field(default_factory=PromptSection)
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    objective: ObjectiveSection = dataclasses.field(default_factory=ObjectiveSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys that hold file-system paths: relative values are taken from the current directory and `~`
# expands, when the config is loaded (the resolved paths are what a run records and resumes with).
PATH_KEYS = ("model.checkpoint", "teacher.checkpoint", "data.path", "train.output_dir")


def resolve_paths(config: RunConfig) -> RunConfig:
    """A copy of `config` whose path keys (PATH_KEYS) are absolute; unset ones stay unset."""
    sections = {}
    for key in PATH_KEYS:
        section_name, field = key.split(".")
        section = sections.get(section_name, getattr(config, section_name))
        sections[section_name] = dataclasses.replace(
            section, **{field: optional_user_path(getattr(section, field))})
    return dataclasses.replace(config, **sections)


def _check_value(key: str, value: Any, annotation) -> Any:
    """Returns `value` converted to the annotated type, or raises ConfigKeyError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigKeyError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ConfigKeyError as e:
                errors.append(str(e))
        raise ConfigKeyError(errors[0] if errors else f"{key}: bad value {value!r}")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigKeyError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigKeyError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # PyYAML reads 5e-6 (no decimal point) as a string.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigKeyError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigKeyError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigKeyError(f"{key}: unsupported config type {annotation!r}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigKeyError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigKeyError(
            f"unknown config key {prefix + '.' if prefix else ''}{unknown[0]}; valid keys in {where}: "
            f"{', '.join(sorted(fields))}"
        )
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key)
        else:
            values[name] = _check_value(key, value, hint)
    return cls(**values)


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, equals, raw = text.partition("=")
    keys = key.strip().split(".")
    if not equals or not all(part.strip() for part in keys):
        raise ConfigKeyError(f"override {text!r} must look like section.key=value")
    return [part.strip() for part in keys], yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Reads a YAML run config (or the defaults) and applies `section.key=value` overrides.

    Relative paths in path-valued keys (PATH_KEYS) are resolved against the current directory.
    """
    data: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path} not found")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigKeyError(f"{path} is not valid YAML: {e}") from None
    if overrides and not isinstance(data, dict):
        raise ConfigKeyError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        keys, value = _parse_override(override)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigKeyError(f"override {override!r}: {key} is not a section")
        node[keys[-1]] = value
    return config_from_dict(data)


def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


def _between(low, high, *, open_low=False, open_high=False):
    def inside(v):
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
    return inside, f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


_POSITIVE = ((lambda v: v > 0), "> 0")

# Values a type check lets through but no run can use: refused when the config is read, naming
# the key, before anything is loaded or written (None, where a key allows it, is not checked).
VALUE_RANGES = {
    "model.attention_block_size": _at_least(1),
    "teacher.ema_rate": _between(0, 1),
    "data.max_prompt_tokens": _at_least(1),
    "sampling.temperature": _at_least(0),
    "sampling.top_p": _between(0, 1, open_low=True),
    "sampling.top_k": _at_least(0),
    "sampling.max_new_tokens": _at_least(1),
    "sampling.max_slots": _at_least(1),
    "sampling.kv_cache_fraction": _between(0, 1, open_low=True),
    "sampling.kv_page_size": _at_least(1),
    "objective.teacher_top_k": _at_least(1),
    "objective.beta": _between(0, 1),
    "objective.temperature": _POSITIVE,
    "objective.skip_first": _at_least(0),
    "objective.window": _at_least(1),
    "objective.importance_cap": _POSITIVE,
    "objective.top_rho": _between(0, 1, open_low=True),
    "objective.fork_weight": _at_least(0),
    "objective.discount": _between(0, 1),
    "optimizer.learning_rate": _at_least(0),
    "optimizer.warmup_ratio": _between(0, 1),
    "optimizer.weight_decay": _at_least(0),
    "optimizer.max_grad_norm": _POSITIVE,
    "optimizer.b1": _between(0, 1, open_high=True),
    "optimizer.b2": _between(0, 1, open_high=True),
    "train.steps": _at_least(1),
    "train.batch_size": _at_least(1),
    "train.microbatches": _at_least(1),
    "train.cpu_devices": _at_least(1),
    "train.checkpoint_every": _at_least(1),
    "train.keep_checkpoints": _at_least(1),
    "train.log_every": _at_least(1),
    "train.save_rollouts_every": _at_least(0),
    "eval.n": _at_least(1),
    "eval.max_tokens": _at_least(1),
    "eval.temperature": _at_least(0),
    "eval.top_p": _between(0, 1, open_low=True),
    "eval.top_k": _at_least(0),
}


def check_ranges(config: RunConfig) -> RunConfig:
    """`config`, or a ConfigKeyError naming the first key outside its range (VALUE_RANGES)."""
    for key, (allowed, description) in VALUE_RANGES.items():
        section, field = key.split(".")
        value = getattr(getattr(config, section), field)
        if value is not None and not (math.isfinite(value) and allowed(value)):
            raise ConfigKeyError(f"{key}: must be {description}, got {value!r}")
    return config


def check_combinations(config: RunConfig) -> RunConfig:
    """`config`, or a ConfigKeyError naming a key whose value another key rules out."""
    if config.objective.fork_teacher == "vanilla" and config.objective.kind == "sft":
        raise ConfigKeyError("objective.fork_teacher: vanilla scores fork tokens with the teacher on the student's "
                             "prompt, and objective.kind sft consults no teacher")
    return config


def config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from a nested mapping, checked as a YAML file is (types, ranges, combinations;
    paths resolved)."""
    return check_combinations(check_ranges(resolve_paths(_build(RunConfig, data, ""))))


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
