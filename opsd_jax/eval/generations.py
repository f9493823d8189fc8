"""The generations file: one JSON Lines file per suite (and shard), a header line, then one record
per (problem id, sample index), appended as each sample finishes. A record holds the text and
the sampled token ids it decodes from (`token_ids`, absent in files from before they were kept).

A kill can leave at most one torn last line (no trailing newline): it is detected and cut off on
resume, and its sample regenerated (per-sample seeds make it the same sample). A malformed line
anywhere else, a duplicated key, or a header that disagrees with the run (another tokenizer,
other sampling settings, other prompts, other problems) is refused with the file, line and field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib

FORMAT = "opsd-jax-eval-generations/1"
# Header fields a resumed or merged run must agree on; `shard` is compared separately.
SETTINGS_FIELDS = ("suite", "suite_fingerprint", "tokenizer_fingerprint", "prompt_fingerprint", "sampling",
                   "budgets", "thinking_open")


@dataclasses.dataclass
class Contents:
    header: dict
    records: dict[tuple[str, int], dict]  # (problem id, sample index) -> record, in file order
    torn_bytes: int = 0  # length of a torn last line that was cut off (0: none)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id, added tokens included): two tokenizers that
    would turn the same ids into different text never share it."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def prompt_fingerprint(prompts_ids: list[list[int]]) -> str:
    """sha256 over every prompt's token ids (chat template, instruction and problems together)."""
    return hashlib.sha256(json.dumps(prompts_ids).encode()).hexdigest()


def sample_seed(base_seed: int, problem_id: str, sample_index: int) -> int:
    """A 62-bit seed per (problem, sample): a resumed or sharded run regenerates exactly the sample
    it is missing, whatever else shares the batch."""
    digest = hashlib.sha256(f"{base_seed}/{problem_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def shard_of(problem_id: str, sample_index: int, shards: int) -> int:
    """Which of `shards` processes generates a sample: a stable hash, so hard problems (long
    generations) spread over shards instead of landing on one."""
    return zlib.crc32(f"{problem_id}/{sample_index}".encode()) % shards


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return index, count


def process_shard(shard: tuple[int, int], process_index: int, process_count: int) -> tuple[int, int]:
    """The shard one process of a multi-process launch generates: shard i of n splits over the
    P processes as shards i + n*p of n*P, so the P of them hold exactly shard i's samples
    (shard_of(key, n*P) = i + n*p exactly when shard_of(key, n) = i)."""
    index, count = shard
    return index + count * process_index, count * process_count


def shard_path(directory: str, shard: tuple[int, int]) -> str:
    index, count = shard
    name = "generations.jsonl" if count == 1 else f"generations.shard-{index:05d}-of-{count:05d}.jsonl"
    return os.path.join(directory, name)


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for field, kind in (("problem_id", str), ("sample_index", int), ("text", str), ("token_count", int),
                        ("finish_reason", str), ("budget_chars", dict)):
        if not isinstance(record.get(field), kind):
            raise ValueError(f"{where}: field {field!r} missing or not {kind.__name__}")
    # Optional: files written before the runner kept the sampled ids have text only.
    ids = record.get("token_ids")
    if ids is not None and not (isinstance(ids, list) and all(type(t) is int for t in ids)):
        raise ValueError(f"{where}: field 'token_ids' must be a list of integers")
    return record


def read(path: str) -> Contents:
    """Header and records of a generations file; a torn last line is reported, not returned."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline; otherwise a torn last line
    if not lines:
        raise ValueError(f"{path}: no header line (empty or torn file)")
    header = None
    records: dict[tuple[str, int], dict] = {}
    first_line: dict[tuple[str, int], int] = {}
    for line_number, raw in enumerate(lines, 1):
        where = f"{path}:{line_number}"
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not valid JSON ({e}); the file is corrupt beyond a torn last line") from None
        if line_number == 1:
            if not isinstance(row, dict) or row.get("format") != FORMAT:
                raise ValueError(f"{where}: not an opsd-jax generations header (format {FORMAT!r} expected)")
            header = row
            continue
        record = _check_record(row, where)
        key = (record["problem_id"], record["sample_index"])
        if key in records:
            raise ValueError(f"{where}: duplicate sample {key} (first at line {first_line[key]})")
        records[key], first_line[key] = record, line_number
    return Contents(header, records, len(tail))


def record_line(record: dict) -> str:
    """One record as one line, without the blanks json puts after separators: a long sample's
    token ids take about 4 bytes each instead of 5 (Qwen3's ids have 5-6 digits)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def check_settings(header: dict, expected: dict, path: str) -> None:
    """Refuses a file written under other settings, naming the first field that differs."""
    for field in SETTINGS_FIELDS:
        if header.get(field) != expected.get(field):
            what = "tokenizer" if field == "tokenizer_fingerprint" else field
            raise ValueError(
                f"{path}: written with a different {what} ({header.get(field)!r}; this run: {expected.get(field)!r}); "
                "refusing to mix samples. Use another --out, or the same settings to resume"
            )


def _has_complete_line(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\n" in f.read(1 << 20)


class Appender:
    """Opens (or creates) a generations file for appending after checking its header; the
    records already present are in `existing`."""

    def __init__(self, path: str, header: dict):
        self.path = path
        self.dropped_torn_line = False
        if os.path.exists(path) and not _has_complete_line(path):
            os.remove(path)  # killed while writing the header: nothing was generated yet
            self.dropped_torn_line = True
        if os.path.exists(path):
            contents = read(path)
            check_settings(contents.header, header, path)
            if contents.header.get("shard") != header.get("shard"):
                raise ValueError(f"{path}: written as shard {contents.header.get('shard')}, this run is shard "
                                 f"{header.get('shard')}")
            if contents.torn_bytes:
                # The sample being written when the process died: cut it off, it is regenerated.
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) - contents.torn_bytes)
                self.dropped_torn_line = True
            self.existing = contents.records
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            temporary = f"{path}.tmp-{os.getpid()}"
            with open(temporary, "w", encoding="utf-8") as f:
                f.write(json.dumps(header, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            self.existing = {}
        self._file = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        """One record, one write of one line: a kill tears at most this line."""
        self._file.write(record_line(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_atomic(path: str, text: str) -> None:
    """Writes a whole file under a temporary name and renames it into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def shard_files(directory: str) -> list[str]:
    """The shard files in a suite's folder (any shard count), sorted by name."""
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory))
            if n.startswith("generations.shard-") and n.endswith(".jsonl")]


def _sources(directory: str) -> list[str]:
    """Every generations file of a suite's folder: the merged or single-process file first."""
    whole = shard_path(directory, (0, 1))
    return ([whole] if os.path.exists(whole) else []) + shard_files(directory)


def samples_elsewhere(directory: str, shard: tuple[int, int], header: dict) -> set[tuple[str, int]]:
    """Samples already in the folder's files of other shard counts (an earlier launch with
    another number of processes, or the merged file), so a relaunch does not generate them
    again. Files of this shard count are skipped: their samples belong to other shards.
    Each file must have been written under this run's settings."""
    keys: set[tuple[str, int]] = set()
    for path in _sources(directory):
        contents = read(path)
        if contents.header["shard"][1] == shard[1]:
            continue
        check_settings(contents.header, header, path)
        keys.update(contents.records)  # a torn last line is not among them: its sample is regenerated
    return keys


def _check_complete(directory: str, merged: dict, sources: list[tuple[str, Contents]]) -> None:
    """Every problem must have samples 0..N-1 (N: the most any problem has). A problem with no
    samples at all is only seen by grading, which knows the suite."""
    by_problem: dict[str, set[int]] = {}
    for problem_id, sample_index in merged:
        by_problem.setdefault(problem_id, set()).add(sample_index)
    n = max((max(s) + 1 for s in by_problem.values()), default=0)
    short = [p for p, s in by_problem.items() if len(s) < n]
    if not short:
        return
    hints = []
    for count in sorted({c.header["shard"][1] for _, c in sources} - {1}):
        present = {c.header["shard"][0] for _, c in sources if c.header["shard"][1] == count}
        absent = [shard_path(directory, (i, count)) for i in range(count) if i not in present]
        if absent:
            hints.append(f"{len(absent)} of {count} shard files absent, e.g. {absent[0]}")
    hints += [f"{path} ends in a torn line" for path, c in sources if c.torn_bytes]
    raise ValueError(
        f"{directory}: incomplete: problem {short[0]!r} has {len(by_problem[short[0]])} of samples 0..{n - 1} "
        f"({len(short)} problems short){'; ' + '; '.join(hints) if hints else ''}. Finish (resume) every shard "
        "before merging: the same eval command, with any number of processes, generates only what is missing"
    )


def merge_shards(directory: str) -> Contents:
    """Merges every generations file in a suite's folder into generations.jsonl (written
    atomically): the shard files, of one shard count or of several (a launch resumed with
    another number of processes), and the merged or single-process file already there.

    The files must agree on their settings; each sample must sit in the file of the shard it
    belongs to, and is kept once; every problem must end with the same samples 0..N-1. A torn
    last line is left out (its sample is missing unless another file has it).
    """
    names = shard_files(directory)
    if not names:
        raise FileNotFoundError(f"{directory}: no generations.shard-*.jsonl files to merge")
    contents = [(path, read(path)) for path in _sources(directory)]
    first_path, first = contents[0]
    merged: dict[tuple[str, int], dict] = {}
    for path, c in contents:
        check_settings(c.header, first.header, path)
        index, count = c.header["shard"]
        for key, record in c.records.items():
            if shard_of(*key, count) != index:
                raise ValueError(f"{path}: sample {key} belongs to shard {shard_of(*key, count)}")
            merged.setdefault(key, record)
    _check_complete(directory, merged, contents)
    header = dict(first.header, shard=[0, 1])
    lines = [json.dumps(header, ensure_ascii=False)] + [record_line(r) for r in merged.values()]
    write_atomic(shard_path(directory, (0, 1)), "\n".join(lines) + "\n")
    return Contents(header, merged)
