"""Problem readers and the grain pipeline."""

import json

import numpy as np
import pytest

from opsd_jax.data import DataError, problem_dataset, read_problems, sources


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_presets_and_formats(tmp_path):
    rows = [{"problem": f"p{i}", "solution": f"s{i}", "Answer": str(i)} for i in range(5)]
    jsonl = _write_jsonl(tmp_path / "ot.jsonl", rows)
    problems = read_problems(jsonl, preset="openthoughts")
    assert [p.answer for p in problems] == ["0", "1", "2", "3", "4"]
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "ot.parquet"))
    assert read_problems(str(tmp_path / "ot.parquet"), preset="openthoughts") == problems
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ot_disk"))
    assert read_problems(str(tmp_path / "ot_disk"), preset="openthoughts") == problems
    countdown = [{"datapoint_input_text": "make 24", "response_suffix": "4*6", "response_answer_only": "24"}]
    assert read_problems(_write_jsonl(tmp_path / "cd.jsonl", countdown), preset="countdown")[0].solution == "4*6"


def test_bad_data_is_named(tmp_path):
    missing = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "x", "solution": "y"}])
    with pytest.raises(DataError, match=r"m.jsonl:1: no column 'answer'"):
        read_problems(missing)
    blank = _write_jsonl(tmp_path / "b.jsonl", [{"problem": "x", "solution": "y", "answer": "1"},
                                                {"problem": "x", "solution": " ", "answer": "1"},
                                                {"problem": "x", "solution": "y", "answer": None}])
    with pytest.raises(DataError, match=r"b.jsonl:2: column 'solution' is empty"):
        read_problems(blank)
    with pytest.raises(DataError, match=r"n.jsonl:1: column 'answer' is null"):
        read_problems(_write_jsonl(tmp_path / "n.jsonl", [{"problem": "x", "solution": "y", "answer": None}]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_problems(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"problem": "a", "solution": "b", "answer": "c"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_problems(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="not found"):
        read_problems(str(tmp_path / "nope.jsonl"))


def test_only_the_fields_a_run_reads_must_hold_text(tmp_path):
    """A dense run reads the solution, not the answer: an empty or null answer is no reason to stop
    it. An empty privileged context stops a run unless kept (the paper's trainer keeps it); an
    empty problem or a null in a field the run reads always stops it."""
    from opsd_jax.config import load_config
    from opsd_jax.distill.trainer import used_context

    rows = [{"problem": "p1", "solution": "s1", "answer": None},
            {"problem": "p2", "solution": "", "answer": " "}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl:1: column 'answer' is null"):
        read_problems(path)
    with pytest.raises(DataError, match=r"d.jsonl:2: column 'solution' is empty \(data.empty_context: keep"):
        read_problems(path, used=("problem", "solution"))
    kept = read_problems(path, used=("problem", "solution"), keep_empty=True)
    assert [(p.problem, p.solution, p.answer) for p in kept] == [("p1", "s1", ""), ("p2", "", " ")]
    assert len(read_problems(path, used=("problem",))) == 2
    with pytest.raises(DataError, match=r"d.jsonl:1: column 'answer' is null"):
        read_problems(path, used=("problem", "answer"), keep_empty=True)
    blank_problem = _write_jsonl(tmp_path / "b.jsonl", [{"problem": " ", "solution": "s", "answer": "a"}])
    with pytest.raises(DataError, match=r"b.jsonl:1: column 'problem' is empty$"):
        read_problems(blank_problem, used=("problem",), keep_empty=True)
    with pytest.raises(DataError, match=r"no column 'answer'"):
        read_problems(_write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "s"}]), used=("problem",))

    def used(*overrides):
        return used_context(load_config(None, list(overrides)))

    assert used("prompt.privilege=dense") == used("prompt.privilege=fraction") == ("solution",)
    assert used("prompt.privilege=sparse") == ("answer",)
    assert used("prompt.privilege=none") == used("prompt.privilege=instruction") == ()
    assert used("prompt.privilege=sparse", "objective.kind=sft") == ("solution",)


def test_shuffled_endless_and_resumable(tmp_path):
    problems = read_problems(_write_jsonl(tmp_path / "p.jsonl", [
        {"id": f"q{i}", "problem": "p", "solution": "s", "answer": "a"} for i in range(7)]))
    iterator = iter(problem_dataset(problems, seed=3))
    first_epoch = [next(iterator).id for _ in range(7)]
    assert sorted(first_epoch) == sorted(p.id for p in problems) and first_epoch != [p.id for p in problems]
    state = iterator.get_state()
    after = [next(iterator).id for _ in range(9)]
    resumed = iter(problem_dataset(problems, seed=3))
    resumed.set_state(state)
    assert [next(resumed).id for _ in range(9)] == after
    hosts = [[next(iter(problem_dataset(problems, seed=3, process_index=h, process_count=2))).id] for h in (0, 1)]
    assert hosts[0] != hosts[1]


@pytest.mark.parametrize("n", [1, 2, 10, 997, 15000])
def test_torch_randperm_is_reproduced_draw_for_draw(n):
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(42)
    state = np.random.RandomState(42)
    for _ in range(2):  # one generator across epochs, as TRL's sampler keeps it
        expected = torch.randperm(n, generator=generator).numpy()
        np.testing.assert_array_equal(sources._torch_randperm(n, state), expected)


@pytest.mark.parametrize("n, batch_size, epochs", [(1000, 64, 2), (200, 8, 1)])
def test_paper_order_is_the_paper_trainers_sampler_over_the_datasets_shuffle(n, batch_size, epochs, rng):
    """The oracle is the paper's own pipeline: `datasets`' shuffle(seed) of the file's rows, then
    TRL's RepeatSampler (shuffle, seed, chunks of the global batch, the partial chunk dropped),
    iterated once per epoch."""
    datasets = pytest.importorskip("datasets")
    trl_utils = pytest.importorskip("trl.trainer.utils")
    seed = int(rng.integers(1000))
    shuffled = datasets.Dataset.from_dict({"row": list(range(n))}).shuffle(seed=seed)["row"]
    sampler = trl_utils.RepeatSampler(range(n), mini_repeat_count=1, batch_size=batch_size, seed=seed)
    expected = [shuffled[i] for _ in range(epochs) for i in sampler]
    order = sources.paper_order(n, seed=seed, batch_size=batch_size, epochs=epochs)
    assert order.tolist() == expected and len(expected) == epochs * (n // batch_size) * batch_size


def test_paper_order_splits_each_batch_between_hosts_and_resumes(tmp_path):
    problems = read_problems(_write_jsonl(tmp_path / "p.jsonl", [
        {"id": f"q{i}", "problem": "p", "solution": "s", "answer": "a"} for i in range(70)]))
    order = sources.paper_order(70, seed=42, batch_size=8, epochs=2)  # 8 batches per epoch, 6 rows left out
    steps = 12
    hosts = [iter(problem_dataset(problems, seed=42, process_index=h, process_count=2, order="paper",
                                  batch_size=8, steps=steps)) for h in (0, 1)]
    for step in range(steps):
        drawn = [next(hosts[h]).id for h in (0, 1) for _ in range(4)]
        assert drawn == [problems[i].id for i in order[step * 8:(step + 1) * 8]]
    state = hosts[1].get_state()
    after = [next(hosts[1]).id for _ in range(4)]
    resumed = iter(problem_dataset(problems, seed=42, process_index=1, process_count=2, order="paper",
                                   batch_size=8, steps=steps))
    resumed.set_state(state)
    assert [next(resumed).id for _ in range(4)] == after
    with pytest.raises(DataError, match="only 70 problems"):
        problem_dataset(problems, seed=42, order="paper", batch_size=128, steps=1)
