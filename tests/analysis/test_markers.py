import pytest

from opsd_jax.analysis.markers import find_markers, load_markers, marker_counts, text_marker_counts, token_pieces
from opsd_jax.testing import qwen3_tokenizer_dir


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir(str(tmp_path_factory.mktemp("qwen3"))))


def _matches(tokenizer, text, markers=None):
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoded, ends = token_pieces(tokenizer, ids)
    assert decoded == text
    return ids, find_markers(decoded, ends, markers or load_markers())


def test_markers_map_to_first_tokens(qwen3):
    text = "<think>\nSo x = 4.\n\nWait, that fails. Hmm... Let me   check: 2+2=4. I think 日本 perhaps.</think>"
    ids, matches = _matches(qwen3, text)
    found = [(m.category, m.phrase.lower()) for m in matches]
    assert found == [("backtracking", "wait"), ("hedging", "hmm"), ("verification", "let me   check"),
                     ("hedging", "i think"), ("hedging", "perhaps")]
    for m in matches:
        first = qwen3.decode(ids[m.first_token])
        # the first token carries the phrase's first word (possibly after whitespace)
        assert first.strip().lower() == m.phrase.split()[0].lower(), (m, first)
        assert qwen3.decode(ids[: m.first_token]) == text[: len(qwen3.decode(ids[: m.first_token]))]
        assert len(qwen3.decode(ids[: m.first_token])) <= m.char_start


def test_no_match_inside_words(qwen3):
    text = "The awaited result, perhapsly unverified, hmmmph; actuallyx reconsiderations and maybes."
    _, matches = _matches(qwen3, text)
    assert matches == []


def test_variants_of_the_markers(qwen3):
    text = ("Hmmm. Verifying: ok, verified. Double-checking, re-check and recheck: confirmed. "
            "No, that\u2019s not right.")
    _, matches = _matches(qwen3, text)
    assert [(m.category, m.phrase.lower()) for m in matches] == [
        ("hedging", "hmmm"), ("verification", "verifying"), ("verification", "verified"),
        ("verification", "double-checking"), ("verification", "re-check"), ("verification", "recheck"),
        ("verification", "confirmed"), ("backtracking", "that\u2019s not right")]


def test_multibyte_characters_split_over_tokens(qwen3):
    text = "答案是 🤔 wait 🤔🤔 maybe"
    ids, matches = _matches(qwen3, text)
    assert [m.phrase for m in matches] == ["wait", "maybe"]
    assert qwen3.decode(ids[matches[1].first_token]).strip() == "maybe"


def test_counts_per_category_and_length_normalization(qwen3):
    from opsd_jax.analysis.metrics import marker_table

    short = "Wait, maybe. " * 2          # 2 backtracking, 2 hedging
    long = "Wait, maybe. " * 2 + "The sum is ten. " * 30
    rows = []
    for text in (short, long):
        ids, matches = _matches(qwen3, text)
        rows.append((len(ids), marker_counts(matches, ("verification", "backtracking", "hedging"))))
    assert rows[0][1] == rows[1][1] == {"verification": 0, "backtracking": 2, "hedging": 2}
    table = marker_table([rows[0]], ("verification", "backtracking", "hedging"))
    assert table["backtracking"]["per_1k_tokens"] == pytest.approx(1000 * 2 / rows[0][0])
    both = marker_table(rows, ("verification", "backtracking", "hedging"))
    assert both["hedging"]["per_1k_tokens"] == pytest.approx(1000 * 4 / (rows[0][0] + rows[1][0]))
    assert both["hedging"]["per_1k_tokens"] < table["hedging"]["per_1k_tokens"]


def test_counts_from_text_alone_are_the_token_mapped_counts(qwen3, rng):
    """The trainer counts each step's markers from one decode of the rollout; `analyze` maps them
    to tokens. Random texts of marker phrases (any case, any whitespace inside), words that only
    contain them, and filler: both count the same."""
    markers = load_markers()
    phrases = [p for ps in markers.values() for p in ps]
    words = phrases + ["awaited", "maybes", "unverified", "the", "sum", "is", "4.", "\n\n", "日本", "x=3,"]
    for _ in range(20):
        pieces = []
        for word in rng.choice(words, size=int(rng.integers(5, 40))):
            word = word.upper() if rng.random() < 0.2 else word
            pieces.append(word.replace(" ", str(rng.choice([" ", "  ", "\n"]))))
        text = " ".join(pieces)
        ids, matches = _matches(qwen3, text, markers)
        assert text_marker_counts(text, markers) == marker_counts(matches, markers), text


def test_bad_marker_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backtracking:\n  - wait\n  - [unclosed\n")
    with pytest.raises(ValueError, match=r"bad.yaml:\d+: markers file is not valid YAML"):
        load_markers(str(bad))
    listless = tmp_path / "listless.yaml"
    listless.write_text("hedging: maybe\n")
    with pytest.raises(ValueError, match="listless.yaml: category 'hedging' must be a non-empty list"):
        load_markers(str(listless))
    empty_phrase = tmp_path / "empty.yaml"
    empty_phrase.write_text("hedging:\n  - maybe\n  - ''\n")
    with pytest.raises(ValueError, match="empty or non-string phrase"):
        load_markers(str(empty_phrase))
    assert set(load_markers()) == {"verification", "backtracking", "hedging"}
    assert {"let me check", "double-check"} <= set(load_markers()["verification"])


def test_word_level_tokenizer_keeps_the_spaces_between_tokens(tmp_path):
    """A word-level tokenizer (the toy world's) decodes a token alone without the space that
    separates it from the previous one; the pieces must still add up to the decoded text, or
    'wait' would never stand on a word boundary."""
    import numpy as np
    import transformers

    from opsd_jax.toyworld import world

    world.save_tokenizer(str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<think> try 3 + 8 = 11 wait try 1 + 8 = 9 maybe verify 1 + 8 = 9 ok </think> \\boxed{ 1 }"
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoded, ends = token_pieces(tokenizer, ids)
    assert decoded == tokenizer.decode(ids) == text
    assert np.all(np.diff(ends) > 0)
    matches = find_markers(decoded, ends, load_markers())
    assert [(m.category, m.phrase) for m in matches] == [("backtracking", "wait"), ("hedging", "maybe"),
                                                       ("verification", "verify")]
    assert [tokenizer.convert_ids_to_tokens(ids[m.first_token]) for m in matches] == ["wait", "maybe", "verify"]
