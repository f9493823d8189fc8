"""Problem readers and the grain pipeline."""

import json

import pytest

from opsd_jax.data import DataError, problem_dataset, read_problems


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
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_problems(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"problem": "a", "solution": "b", "answer": "c"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_problems(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="not found"):
        read_problems(str(tmp_path / "nope.jsonl"))


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
