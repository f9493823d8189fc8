"""Eval runner: suites -> chat prompts -> sampler -> generations files -> grades and metrics.

Each (problem, sample) is its own request with its own seed (generations.sample_seed), so a
killed run resumes with exactly the missing samples and a sharded run splits samples across
processes without coordination. Samples are appended as they finish, in whatever order the
continuous batcher completes them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue

from tqdm.auto import tqdm

from opsd_jax.eval import generations, report, score
from opsd_jax.eval.grader import THINK_OPEN
from opsd_jax.eval.suites import Suite

DEFAULT_BUDGETS = (4096, 8192, 16384, 32768)
# SamplingParams' fields as `opsd-jax eval` spells them.
_SAMPLING_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
                   "max_new_tokens": "--max-tokens"}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What a run samples. The paper's thinking-model setting: 16 samples at a 38,912-token cap,
    temperature 0.6, top-p 0.95 (instruct models: 0.7 / 0.8)."""

    n: int = 16
    max_tokens: int = 38912
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0
    instruction: str | None = None  # appended to the problem after a blank line
    enable_thinking: bool | None = None  # passed to the chat template when set (Qwen3)
    # None: those of DEFAULT_BUDGETS below max_tokens. Given ones must not exceed max_tokens.
    budgets: tuple[int, ...] | None = None

    def validate(self) -> None:
        """Raises ValueError naming the command-line flag. Called before any file is written: a
        generations file records its sampling, and a run with other settings refuses to add to it."""
        from opsd_jax.sampler import SamplingParams

        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        try:
            SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                           max_new_tokens=self.max_tokens).validate()
        except ValueError as e:  # the sampler's own check, its field named as the flag that sets it
            field, _, rest = str(e).partition(" ")
            raise ValueError(f"{_SAMPLING_FLAGS.get(field, field)} {rest}") from None
        if any(b < 1 for b in self.budgets or ()):
            raise ValueError(f"--budgets must be positive, got {self.budgets}")
        beyond = sorted(b for b in self.budgets or () if b > self.max_tokens)
        if beyond:
            raise ValueError(f"--budgets {', '.join(map(str, beyond))} exceed --max-tokens {self.max_tokens}: a budget "
                             "is graded by cutting the generations, so none can be longer than the cap")

    def cut_budgets(self) -> list[int]:
        """Budgets shorter than the cap (the cap itself is always graded)."""
        budgets = DEFAULT_BUDGETS if self.budgets is None else self.budgets
        return sorted({b for b in budgets if b < self.max_tokens})

    def sampling_record(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "max_tokens": self.max_tokens}


def build_prompts(tokenizer, suite: Suite, settings: EvalSettings) -> list[list[int]]:
    """Token ids of each problem as the user turn of the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; evaluation prompts the problem as a user turn")
    kwargs = {} if settings.enable_thinking is None else {"enable_thinking": settings.enable_thinking}
    prompts = []
    for problem in suite.problems:
        content = problem.problem if not settings.instruction else f"{problem.problem}\n\n{settings.instruction}"
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False, **kwargs)
        if not isinstance(ids, list):  # some tokenizers return a BatchEncoding regardless
            ids = ids["input_ids"]
        prompts.append([int(t) for t in ids])
    return prompts


def prompt_opens_thinking(tokenizer, prompt_ids: list[int]) -> bool:
    """True when the generation prompt itself opens a <think> block (OLMo-3 Think)."""
    tail = tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False).rstrip()
    return tail.endswith(THINK_OPEN)


def make_record(completion, tokenizer, stop_token_ids, problem_id: str, sample_index: int, seed: int,
                budgets: list[int]) -> dict:
    """A generations-file row. Text keeps special tokens such as <think> (the grader needs them)
    except the stop token; token_count includes it, as it took a generation step. token_ids are
    the sampled ids `text` decodes from (the stop token excluded): `analyze` scores them, since
    a sampled sequence need not be the one the tokenizer would encode the text into."""
    ids = list(completion.token_ids)
    body = ids[:-1] if completion.finish_reason == "stop" and ids and ids[-1] in stop_token_ids else ids
    text = tokenizer.decode(body, skip_special_tokens=False)
    cuts = {}
    for budget in budgets:
        if budget < len(ids):
            # A cut inside a multi-byte character decodes to a replacement character; the prefix
            # length is right to within that one character.
            cuts[str(budget)] = min(len(tokenizer.decode(body[:budget], skip_special_tokens=False)), len(text))
    return {"problem_id": problem_id, "sample_index": sample_index, "seed": seed, "token_count": len(ids),
            "finish_reason": completion.finish_reason, "text": text, "budget_chars": cuts,
            "token_ids": [int(t) for t in body]}


def suite_header(suite: Suite, settings: EvalSettings, tokenizer, prompts, shard, checkpoint: str) -> dict:
    return {
        "format": generations.FORMAT, "suite": suite.name, "suite_fingerprint": suite.fingerprint,
        "tokenizer_fingerprint": generations.tokenizer_fingerprint(tokenizer),
        "prompt_fingerprint": generations.prompt_fingerprint(prompts),
        "sampling": settings.sampling_record(), "budgets": settings.cut_budgets(),
        "thinking_open": prompt_opens_thinking(tokenizer, prompts[0]),
        "instruction": settings.instruction, "enable_thinking": settings.enable_thinking,
        "shard": list(shard), "checkpoint": os.path.abspath(checkpoint), "suite_source": suite.source,
    }


def generate_suite(orchestrator, tokenizer, suite: Suite, directory: str, settings: EvalSettings, *,
                   shard=(0, 1), stop_token_ids=(), checkpoint: str = "", progress: bool = True) -> dict:
    """Generates this shard's missing samples of one suite into its generations file.

    Returns counts: existing (this shard's samples already on disk, in its own file or, from a
    launch with another number of processes, in other files of the folder), generated, and
    dropped_torn_line.
    """
    from opsd_jax.sampler import SamplingParams

    prompts = build_prompts(tokenizer, suite, settings)
    header = suite_header(suite, settings, tokenizer, prompts, shard, checkpoint)
    path = generations.shard_path(directory, shard)
    with generations.Appender(path, header) as appender:
        done = set(appender.existing) | generations.samples_elsewhere(directory, shard, header)
        mine = [(index, problem.id, sample)
                for sample in range(settings.n) for index, problem in enumerate(suite.problems)
                if generations.shard_of(problem.id, sample, shard[1]) == shard[0]]
        missing = [item for item in mine if item[1:] not in done]
        bar = tqdm(total=len(missing), desc=f"{suite.name} samples", unit="sample", disable=not progress)
        # One request per problem for all its missing samples: the prompt is prefilled once and its
        # pages are shared; per-sample seeds keep every sample what an n=1 request would draw. A
        # bounded window of samples in flight keeps every slot busy while leaving little work
        # behind when the run is interrupted. Each sample is written the moment it finishes.
        by_problem: dict[int, list] = {}
        for index, problem_id, sample in missing:
            by_problem.setdefault(index, []).append((sample, generations.sample_seed(settings.seed, problem_id,
                                                                                        sample)))
        window = 4 * orchestrator.engine.sampler_config.max_slots
        pending = collections.deque(by_problem.items())
        finished: queue.Queue = queue.Queue()
        in_flight: dict = {}
        samples_in_flight = 0

        def write(item) -> None:
            problem_id, sample, seed, completion = item
            appender.append(make_record(completion, tokenizer, stop_token_ids, problem_id, sample, seed,
                                        settings.cut_budgets()))
            bar.update(1)

        try:
            while pending or in_flight:
                while pending and samples_in_flight < window:
                    index, samples = pending.popleft()
                    problem_id = suite.problems[index].id
                    sampling = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                              top_k=settings.top_k, max_new_tokens=settings.max_tokens,
                                              stop_token_ids=tuple(stop_token_ids))

                    def on_token(i, completion, problem_id=problem_id, samples=samples):
                        if completion.finish_reason is not None:
                            finished.put((problem_id, *samples[i], completion))

                    future = orchestrator.submit(prompts[index], sampling, n=len(samples), on_token=on_token,
                                                 sample_seeds=[seed for _, seed in samples])
                    in_flight[future] = (problem_id, len(samples))
                    samples_in_flight += len(samples)
                try:
                    write(finished.get(timeout=0.5))
                    samples_in_flight -= 1
                except queue.Empty:
                    pass
                for future in [f for f in in_flight if f.done()]:
                    problem_id, _ = in_flight.pop(future)
                    try:
                        future.result()
                    except ValueError as e:
                        raise ValueError(f"{suite.name} problem {problem_id}: {e}") from None
            while not finished.empty():
                write(finished.get_nowait())
        finally:
            for future in in_flight:
                future.cancel()
            bar.close()
    return {"path": path, "existing": len(mine) - len(missing), "generated": len(missing),
            "dropped_torn_line": appender.dropped_torn_line}


def score_run(out: str, suites: list[Suite] | None = None, *, merge: bool = False, timeout_seconds: int = 5,
              progress: bool = True, grading="strict") -> dict:
    """Grades every suite folder under `out` (with `merge`, a folder's shard files, where it has
    any, are merged into its generations.jsonl first), then writes
    summary.json, summary.md and accuracy_vs_budget.png. `suites` defaults to the suites named in
    the generations headers (built-in names or their recorded source files).

    grading: "strict", "paper", or several ("strict,paper" or a sequence) to grade side by side;
    each mode writes its own metrics folder (score.metrics_folder), summary.md gets a row per
    mode, summary.json records the first (primary) mode under "grading" and every mode under
    "by_grading". Returns the primary mode's {suite: {budget: metrics}}."""
    from opsd_jax.eval.suites import load_suite

    modes = score.parse_gradings(grading)
    results_by_grading: dict[str, dict] = {mode: {} for mode in modes}
    wanted = {s.name: s for s in suites} if suites else None
    names = sorted(wanted) if wanted else sorted(
        d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))
        and any(n.startswith("generations") for n in os.listdir(os.path.join(out, d))))
    if not names:
        raise FileNotFoundError(f"{out}: no SUITE/generations*.jsonl to grade")
    for name in tqdm(names, desc="grading", disable=not progress):
        directory = os.path.join(out, name)
        contents = generations.merge_shards(directory) if merge and generations.shard_files(directory) else (
            generations.read(generations.shard_path(directory, (0, 1))))
        if contents.torn_bytes:
            raise ValueError(f"{directory}/generations.jsonl ends in a torn line; resume the run before grading")
        header = contents.header
        suite = wanted[name] if wanted else load_suite(
            header["suite"] if header["suite"] in ("aime24", "aime25", "hmmt25") else header["suite_source"])
        if suite.fingerprint != header["suite_fingerprint"]:
            raise ValueError(f"{directory}: generations were made for other problems than suite {suite.name} "
                             f"({suite.source}) now holds")
        for mode in modes:
            results_by_grading[mode][name] = score.score_suite(list(contents.records.values()), header, suite,
                                                               directory, timeout_seconds=timeout_seconds,
                                                               grading=mode)
    primary = modes[0]
    results = results_by_grading[primary]
    fields = ("accuracy", "accuracy_ci95", "accuracy_boxed_only", "pass@k", "samples_per_problem", "length",
              "extraction", "timeouts")
    summary = {suite: {str(b): {**{k: m[k] for k in fields}, "grading": primary,
                                "by_grading": {mode: {k: results_by_grading[mode][suite][b][k] for k in fields
                                                      if k != "length"} for mode in modes}}
                       for b, m in by_budget.items()} for suite, by_budget in results.items()}
    generations.write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    generations.write_atomic(os.path.join(out, "summary.md"), score.summary_markdown(
        results_by_grading, f"eval: {out} (grading: {', '.join(modes)})"))
    label = os.path.basename(os.path.normpath(out))
    plotted = ({label: results} if modes == ("strict",)
               else {f"{label} [{mode} grading]": results_by_grading[mode] for mode in modes})
    report.plot_accuracy_vs_budget(plotted, os.path.join(out, "accuracy_vs_budget.png"))
    return results


def run_eval(checkpoint: str, suites: list[Suite], out: str, settings: EvalSettings, *, shard=(0, 1), mesh=None,
             dtype: str = "bfloat16", max_slots: int = 8, progress: bool = True, timeout_seconds: int = 5,
             grading="strict") -> dict:
    """Generates (resuming) every suite for this shard; a single-shard run also grades (under
    `grading`, as in score_run) and writes the reports.
    Returns {"generation": {suite: counts}, "metrics": {suite: {budget: metrics}}}."""
    from opsd_jax.checkpoint.loading import default_stop_token_ids, load_for_serving
    from opsd_jax.sampler import Engine, Orchestrator, SamplerConfig

    settings.validate()
    score.parse_gradings(grading)  # a bad mode fails before hours of generation
    config, params, tokenizer, side_dir = load_for_serving(checkpoint, dtype=dtype, mesh=mesh)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {side_dir} has no chat template; evaluation prompts the problem as "
                         "a user turn")
    stop_token_ids = default_stop_token_ids(tokenizer, side_dir)
    longest_prompt = max(len(p) for s in suites for p in build_prompts(tokenizer, s, settings))
    engine = Engine(config, SamplerConfig(max_slots=max_slots,
                                          max_sequence_length=longest_prompt + settings.max_tokens,
                                          max_prompt_length=longest_prompt,
                                          valid_vocab_size=min(len(tokenizer), config.vocab_size)), mesh=mesh)
    if progress:
        print(f"decode state: {engine.decode_state_bytes / 2**30:.2f} GiB for {max_slots} slots x "
              f"{engine.max_sequence_length} tokens", flush=True)
    counts = {}
    with Orchestrator(engine, params) as orchestrator:
        for suite in suites:
            counts[suite.name] = generate_suite(
                orchestrator, tokenizer, suite, os.path.join(out, suite.name), settings, shard=shard,
                stop_token_ids=stop_token_ids, checkpoint=checkpoint, progress=progress)
    result = {"generation": counts}
    if shard[1] == 1:
        # Shard files beside the file just written hold samples it skipped: grade their union.
        result["metrics"] = score_run(out, suites, merge=True, timeout_seconds=timeout_seconds,
                                      progress=progress, grading=grading)
    return result
