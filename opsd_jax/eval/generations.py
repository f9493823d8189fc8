"""The generations file: one JSON Lines file per suite (and shard), a header line, then one record
per (problem id, sample index), appended as each sample finishes.

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
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
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


def merge_shards(directory: str) -> Contents:
    """Merges every shard file in a suite's folder into generations.jsonl (written atomically).

    All shards of one count must be present and agree on their settings; each sample must come
    from the shard it belongs to, once.
    """
    names = sorted(n for n in os.listdir(directory) if n.startswith("generations.shard-") and n.endswith(".jsonl"))
    if not names:
        raise FileNotFoundError(f"{directory}: no generations.shard-*.jsonl files to merge")
    contents = [(os.path.join(directory, n), read(os.path.join(directory, n))) for n in names]
    first_path, first = contents[0]
    count = first.header["shard"][1]
    indices = sorted(c.header["shard"][0] for _, c in contents if c.header["shard"][1] == count)
    if len(contents) != count or indices != list(range(count)):
        raise ValueError(f"{directory}: expected shards 0..{count - 1} of {count}, found {[n for n in names]}")
    merged: dict[tuple[str, int], dict] = {}
    for path, c in contents:
        check_settings(c.header, first.header, path)
        if c.torn_bytes:
            raise ValueError(f"{path}: ends in a torn line; resume that shard before merging")
        for key, record in c.records.items():
            if shard_of(*key, count) != c.header["shard"][0]:
                raise ValueError(f"{path}: sample {key} belongs to shard {shard_of(*key, count)}")
            merged[key] = record
    header = dict(first.header, shard=[0, 1])
    lines = [json.dumps(header, ensure_ascii=False)] + [json.dumps(r, ensure_ascii=False) for r in merged.values()]
    write_atomic(shard_path(directory, (0, 1)), "\n".join(lines) + "\n")
    return Contents(header, merged)
