"""Self-correction markers (verification, backtracking, hedging) in rollout text, mapped back to
the tokens that start them.

Text and token offsets come from one decode: each token's piece is decoded in order, so the
characters a match covers map to tokens exactly, whatever the tokenizer does at piece boundaries
(a multi-byte character split over tokens belongs to the token that completes it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import numpy as np

DEFAULT_MARKERS_PATH = os.path.join(os.path.dirname(__file__), "markers.yaml")


@dataclasses.dataclass(frozen=True)
class MarkerMatch:
    category: str
    phrase: str  # as written in the text
    char_start: int
    char_end: int
    first_token: int  # index into the rollout's token ids


def load_markers(path: str | None = None) -> dict[str, list[str]]:
    """{category: [phrase, ...]} from a YAML mapping; errors name the file and the bad entry."""
    import yaml

    path = path or DEFAULT_MARKERS_PATH
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ValueError(f"{where}: markers file is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: markers file must map categories to lists of phrases, got {type(data).__name__}")
    markers = {}
    for category, phrases in data.items():
        if not isinstance(category, str) or not category.strip():
            raise ValueError(f"{path}: category names must be non-empty strings, got {category!r}")
        if not isinstance(phrases, list) or not phrases:
            raise ValueError(f"{path}: category {category!r} must be a non-empty list of phrases")
        for phrase in phrases:
            if not isinstance(phrase, str) or not phrase.strip():
                raise ValueError(f"{path}: category {category!r} has an empty or non-string phrase {phrase!r}")
        markers[category] = [p.strip() for p in phrases]
    return markers


def _pattern(phrases: list[str]) -> re.Pattern:
    return _compiled_pattern(tuple(phrases))


@functools.lru_cache(maxsize=64)
def _compiled_pattern(phrases: tuple[str, ...]) -> re.Pattern:
    # Longest first so "let me check again" wins over "let me check"; lookarounds instead of \b so
    # phrases that start or end with punctuation ("double-check", "hmm...") still need a word edge.
    parts = [r"\s+".join(re.escape(w) for w in p.split()) for p in sorted(set(phrases), key=len, reverse=True)]
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)


def token_pieces(tokenizer, token_ids: list[int]) -> tuple[str, np.ndarray]:
    """(text, char_end_T): the decoded text and, per token, the character offset where it ends.

    A token that ends inside a multi-byte character gets no characters (its end equals the
    previous end); the token completing the character takes them all.
    """
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    ends_T = np.zeros(len(token_ids), np.int64)
    text, start = "", 0
    for t in range(len(token_ids)):
        # Decoded with the previous token as context: a word-level tokenizer puts the space that
        # separates two tokens only between them, never on a token decoded alone.
        context = decode(token_ids[start - 1: start]) if start else ""
        joined = decode(token_ids[max(start - 1, 0): t + 1])
        piece = joined[len(context):] if joined.startswith(context) else decode(token_ids[start: t + 1])
        if piece.endswith("\ufffd") and t + 1 < len(token_ids):
            ends_T[t] = len(text)  # an incomplete character: wait for the next token
            continue
        text += piece
        ends_T[t] = len(text)
        start = t + 1
    return text, ends_T


def find_markers(text: str, char_end_T: np.ndarray, markers: dict[str, list[str]]) -> list[MarkerMatch]:
    """Every marker occurrence, per category non-overlapping, with the index of its first token
    (the first token whose characters reach past the match start)."""
    matches = []
    for category, phrases in markers.items():
        for m in _pattern(phrases).finditer(text):
            first = int(np.searchsorted(char_end_T, m.start(), side="right"))
            matches.append(MarkerMatch(category, m.group(0), m.start(), m.end(), first))
    return sorted(matches, key=lambda m: (m.char_start, m.category))


def text_marker_counts(text: str, markers: dict[str, list[str]]) -> dict[str, int]:
    """{category: occurrences in `text`}, matched as `find_markers` matches them; no token offsets
    needed, so one decode of a whole rollout serves (the trainer counts every step's rollouts)."""
    return {category: sum(1 for _ in _pattern(phrases).finditer(text)) for category, phrases in markers.items()}


def marker_counts(matches: list[MarkerMatch], categories) -> dict[str, int]:
    counts = {c: 0 for c in categories}
    for m in matches:
        counts[m.category] += 1
    return counts
