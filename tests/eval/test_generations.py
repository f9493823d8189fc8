"""The generations file: torn last lines, malformed lines, duplicates, other tokenizers, shards."""

import json
import os

import pytest

from opsd_jax.eval import generations
from opsd_jax.eval.generations import Appender, merge_shards, read, shard_of, shard_path


def header(**overrides):
    base = {"format": generations.FORMAT, "suite": "s", "suite_fingerprint": "f", "tokenizer_fingerprint": "t",
            "prompt_fingerprint": "p", "sampling": {"temperature": 0.6, "max_tokens": 8}, "budgets": [4],
            "thinking_open": False, "shard": [0, 1]}
    return {**base, **overrides}


def record(problem_id="a", sample_index=0, text="\\boxed{1}"):
    return {"problem_id": problem_id, "sample_index": sample_index, "seed": 1, "token_count": 5,
            "finish_reason": "stop", "text": text, "budget_chars": {"4": 3}}


def test_append_and_resume(tmp_path):
    path = str(tmp_path / "s" / "generations.jsonl")
    with Appender(path, header()) as appender:
        assert appender.existing == {}
        appender.append(record("a", 0))
        appender.append(record("a", 1))
    with Appender(path, header()) as appender:
        assert sorted(appender.existing) == [("a", 0), ("a", 1)] and not appender.dropped_torn_line
        appender.append(record("b", 0))
    assert sorted(read(path).records) == [("a", 0), ("a", 1), ("b", 0)]
    assert not [n for n in os.listdir(tmp_path / "s") if ".tmp" in n]


def test_torn_last_line_is_dropped_once(tmp_path):
    path = str(tmp_path / "generations.jsonl")
    with Appender(path, header()) as appender:
        appender.append(record("a", 0))
    line = json.dumps(record("a", 1))
    with open(path, "a") as f:
        f.write(line[: len(line) // 2])  # killed mid-write
    contents = read(path)
    assert sorted(contents.records) == [("a", 0)] and contents.torn_bytes == len(line) // 2
    with Appender(path, header()) as appender:
        assert appender.dropped_torn_line and sorted(appender.existing) == [("a", 0)]
        appender.append(record("a", 1))
    contents = read(path)
    assert sorted(contents.records) == [("a", 0), ("a", 1)] and contents.torn_bytes == 0


def test_malformed_line_names_its_number(tmp_path):
    path = str(tmp_path / "generations.jsonl")
    with Appender(path, header()) as appender:
        appender.append(record("a", 0))
    with open(path, "a") as f:
        f.write("{not json\n")
        f.write(json.dumps(record("a", 1)) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        read(path)
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        Appender(path, header())


def test_missing_field_and_duplicates_are_named(tmp_path):
    path = str(tmp_path / "generations.jsonl")
    bad = record("a", 0)
    del bad["text"]
    with open(path, "w") as f:
        f.write(json.dumps(header()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: field 'text' missing"):
        read(path)
    with open(path, "w") as f:
        f.write(json.dumps(header()) + "\n" + json.dumps(dict(record("a", 0), token_ids=[3, 4.0])) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: field 'token_ids' must be a list of integers"):
        read(path)
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in (header(), record("a", 0), record("b", 0), record("a", 0))) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:4: duplicate sample \('a', 0\) \(first at line 2\)"):
        read(path)
    with open(path, "w") as f:
        f.write(json.dumps(record()) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:1: not an opsd-jax generations header"):
        read(path)


def test_other_tokenizer_or_settings_are_refused(tmp_path):
    path = str(tmp_path / "generations.jsonl")
    with Appender(path, header()) as appender:
        appender.append(record())
    with pytest.raises(ValueError, match="written with a different tokenizer"):
        Appender(path, header(tokenizer_fingerprint="other"))
    with pytest.raises(ValueError, match="written with a different sampling"):
        Appender(path, header(sampling={"temperature": 1.0, "max_tokens": 8}))
    with pytest.raises(ValueError, match="written as shard"):
        Appender(path, header(shard=[1, 2]))
    assert len(read(path).records) == 1  # refused runs leave the file alone


def test_shards_merge_and_cover_every_sample(tmp_path):
    keys = [(p, i) for p in ("a", "b", "c") for i in range(8)]
    shards = 3
    for index in range(shards):
        with Appender(shard_path(str(tmp_path), (index, shards)), header(shard=[index, shards])) as appender:
            for key in keys:
                if shard_of(*key, shards) == index:
                    appender.append(record(*key))
    assert len({shard_of(*k, shards) for k in keys}) == shards  # the hash spreads samples
    merged = merge_shards(str(tmp_path))
    assert sorted(merged.records) == sorted(keys)
    assert sorted(read(str(tmp_path / "generations.jsonl")).records) == sorted(keys)
    assert sorted(merge_shards(str(tmp_path)).records) == sorted(keys)  # merging again changes nothing
    os.remove(shard_path(str(tmp_path), (1, shards)))
    assert sorted(merge_shards(str(tmp_path)).records) == sorted(keys)  # the merged file still holds shard 1
    os.remove(tmp_path / "generations.jsonl")
    with pytest.raises(ValueError, match=r"incomplete: problem '.' has \d of samples 0..7 .*1 of 3 shard files "
                                         r"absent, e.g. .*generations.shard-00001-of-00003.jsonl"):
        merge_shards(str(tmp_path))
    assert not (tmp_path / "generations.jsonl").exists()


def test_a_relaunch_with_another_process_count_merges_the_union(tmp_path):
    """Shards of 3 processes, one cut short by a kill (a torn last line) and one never started;
    the relaunch runs 2 processes and generates only the samples no file holds."""
    directory = str(tmp_path)
    keys = [(p, i) for p in ("a", "b", "c") for i in range(8)]
    old = {index: [k for k in keys if shard_of(*k, 3) == index] for index in range(3)}
    with Appender(shard_path(directory, (0, 3)), header(shard=[0, 3])) as appender:
        for key in old[0]:
            appender.append(record(*key))
    with Appender(shard_path(directory, (1, 3)), header(shard=[1, 3])) as appender:
        for key in old[1][:2]:
            appender.append(record(*key))
    with open(shard_path(directory, (1, 3)), "a") as f:
        f.write(json.dumps(record(*old[1][2]))[:30])
    with pytest.raises(ValueError, match=r"1 of 3 shard files absent.*shard-00001-of-00003.jsonl ends in a torn line"):
        merge_shards(directory)
    done = set(old[0]) | set(old[1][:2])
    for index in range(2):
        elsewhere = generations.samples_elsewhere(directory, (index, 2), header(shard=[index, 2]))
        assert elsewhere == done  # the torn sample is not among them
        with Appender(shard_path(directory, (index, 2)), header(shard=[index, 2])) as appender:
            for key in keys:
                if shard_of(*key, 2) == index and key not in elsewhere:
                    appender.append(record(*key, text=f"new {key}"))
    merged = merge_shards(directory)
    assert sorted(merged.records) == sorted(keys)
    assert [k for k, r in merged.records.items() if r["text"].startswith("new")] == [
        k for k in merged.records if k not in done]
    with pytest.raises(ValueError, match="written with a different sampling"):
        generations.samples_elsewhere(directory, (0, 4), header(shard=[0, 4], sampling={"temperature": 1.0}))


def test_sample_seeds_and_shard_spec():
    assert generations.sample_seed(0, "a", 0) == generations.sample_seed(0, "a", 0)
    seeds = {generations.sample_seed(s, p, i) for s in (0, 1) for p in "ab" for i in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**62 for s in seeds)
    assert generations.parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            generations.parse_shard(bad)


@pytest.mark.parametrize("asked", [(0, 1), (1, 3)])
def test_the_processes_of_a_launch_split_exactly_the_shard_they_were_given(asked):
    keys = [(f"problem-{p}", i) for p in range(40) for i in range(16)]
    processes = 4
    by_process = [{k for k in keys if shard_of(*k, generations.process_shard(asked, p, processes)[1])
                   == generations.process_shard(asked, p, processes)[0]} for p in range(processes)]
    assert all(by_process) and sum(map(len, by_process)) == len(set().union(*by_process))  # disjoint
    assert set().union(*by_process) == {k for k in keys if shard_of(*k, asked[1]) == asked[0]}
    assert generations.process_shard(asked, 0, 1) == asked
