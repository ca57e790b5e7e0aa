"""Tests for lorapipe.scoring and the repository's metric modules (metrics/rouge, exact_match)."""

from __future__ import annotations

import importlib.util
import re
import string
from types import ModuleType

import pytest
from rouge_score import rouge_scorer, tokenizers

from lorapipe.scoring import METRICS_DIR, ROUGE_KEYS, load_metric, score

ENGLISH_PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on the mat."),
    ("Paris is the capital of France", "The capital of France is Paris."),
    ("running runners ran quickly", "the runner runs quick"),
    ("[1, 2, 3]", "[1, 2, 3]"),
    ("It returns None", "None"),
    ("first line\nsecond line here", "second line here\nfirst line"),
    ("snake_case and CamelCase words", "snake case, camelcase words!"),
    ("completely unrelated", "nothing in common"),
]


def _load_rouge_source() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rouge_src", METRICS_DIR / "rouge" / "rouge.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_english_rouge_matches_rouge_score(use_stemmer: bool) -> None:
    preds = [p for p, _ in ENGLISH_PAIRS]
    refs = [r for _, r in ENGLISH_PAIRS]
    aggregate, per_example = score(preds, refs, use_stemmer=use_stemmer)

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=use_stemmer)
    expected = [scorer.score(r, p) for p, r in ENGLISH_PAIRS]
    assert len(per_example) == len(expected)
    for got, want in zip(per_example, expected, strict=True):
        for key in ROUGE_KEYS:
            assert got[key] == pytest.approx(want[key].fmeasure, abs=1e-9)
    for key in ROUGE_KEYS:
        mean = sum(s[key].fmeasure for s in expected) / len(expected)
        assert aggregate[key] == pytest.approx(mean, abs=1e-9)
    # The pairs must exercise the metric: neither all-zero nor all-perfect.
    assert 0.0 < aggregate["rouge1"] < 1.0


def test_stemmer_changes_scores() -> None:
    pair = (["running runners ran quickly"], ["the runner runs quick"])
    plain, _ = score(*pair)
    stemmed, _ = score(*pair, use_stemmer=True)
    assert stemmed["rouge1"] > plain["rouge1"]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_multilingual_tokenizer_equals_default_on_ascii(use_stemmer: bool) -> None:
    ours = _load_rouge_source().MultilingualTokenizer(use_stemmer=use_stemmer)
    theirs = tokenizers.DefaultTokenizer(use_stemmer=use_stemmer)
    texts = [
        "Hello, World! It's 2024_v2 -- snake_case x-y",
        "  tabs\tand\nnewlines   ",
        "generalization ponies caresses agreed 123abc",
        "",
        "!!!",
    ]
    for text in texts:
        assert ours.tokenize(text) == theirs.tokenize(text), text


def test_multilingual_tokenizer_splits_cjk_per_character() -> None:
    tok = _load_rouge_source().MultilingualTokenizer()
    assert tok.tokenize("我爱Python编程") == ["我", "爱", "python", "编", "程"]
    assert tok.tokenize("ひらがなカタカナ") == list("ひらがなカタカナ")
    assert tok.tokenize("한국어 문장") == list("한국어문장")
    assert tok.tokenize("Привет, МИР!") == ["привет", "мир"]


def _plain_normalize(
    text: str,
    regexes: list[str],
    ignore_case: bool,
    ignore_punctuation: bool,
    ignore_whitespace: bool = False,
) -> str:
    for pattern in regexes:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = "".join(c for c in text if c not in string.punctuation)
    if ignore_whitespace:
        text = " ".join(text.split())
    return text.strip()


# Each pair is chosen so that exactly one option (named first) turns a mismatch into a match.
EM_PAIRS = [
    ("case", "ABC", "abc"),
    ("punctuation", "'hello, world!'", "hello world"),
    ("regex", "Answer: 42", "42"),
    ("strip", "  [1, 2]\n", "[1, 2]"),
    ("none", "True", "False"),
]


@pytest.mark.parametrize("ignore_case", [False, True])
@pytest.mark.parametrize("ignore_punctuation", [False, True])
@pytest.mark.parametrize("use_regex", [False, True])
def test_exact_match_matches_plain_normalisation(
    ignore_case: bool, ignore_punctuation: bool, use_regex: bool
) -> None:
    regexes = [r"^Answer:\s*"] if use_regex else []
    preds = [p for _, p, _ in EM_PAIRS]
    refs = [r for _, _, r in EM_PAIRS]
    aggregate, per_example = score(
        preds,
        refs,
        ignore_case=ignore_case,
        ignore_punctuation=ignore_punctuation,
        regexes_to_ignore=regexes or None,
    )
    expected = [
        float(
            _plain_normalize(p, regexes, ignore_case, ignore_punctuation)
            == _plain_normalize(r, regexes, ignore_case, ignore_punctuation)
        )
        for p, r in zip(preds, refs, strict=True)
    ]
    assert [row["exact_match"] for row in per_example] == expected
    assert aggregate["exact_match"] == pytest.approx(sum(expected) / len(expected))
    by_name = {
        name: row["exact_match"] for (name, _, _), row in zip(EM_PAIRS, per_example, strict=True)
    }
    assert by_name == {
        "case": float(ignore_case),
        "punctuation": float(ignore_punctuation),
        "regex": float(use_regex),
        "strip": 1.0,
        "none": 0.0,
    }


@pytest.mark.parametrize("ignore_whitespace", [False, True])
def test_exact_match_module_whitespace(ignore_whitespace: bool) -> None:
    preds = ["a  b\tc", " x ", "a b"]
    refs = ["a b c", "x", "ab"]
    result = load_metric("exact_match").compute(
        predictions=preds,
        references=refs,
        ignore_whitespace=ignore_whitespace,
        use_aggregator=False,
    )
    assert result is not None
    expected = [
        float(
            _plain_normalize(p, [], False, False, ignore_whitespace)
            == _plain_normalize(r, [], False, False, ignore_whitespace)
        )
        for p, r in zip(preds, refs, strict=True)
    ]
    assert result["exact_match"] == expected
    assert expected == [float(ignore_whitespace), 1.0, 0.0]


def test_non_latin_rouge() -> None:
    preds = ["我喜欢吃苹果", "今天天气很好", "Москва — столица России", "你好世界"]
    refs = ["我喜欢吃香蕉", "今天天气很好", "Столица России — большой город", "Привет мир"]
    _, per_example = score(preds, refs)
    zh_shared, zh_same, ru_shared, unrelated = (row["rouge1"] for row in per_example)
    assert 0.0 < zh_shared < 1.0
    assert zh_same == pytest.approx(1.0)
    assert 0.0 < ru_shared < 1.0
    assert unrelated == 0.0
    # rouge_score's own tokenizer drops these scripts entirely, which is why the module exists.
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    assert scorer.score(refs[0], preds[0])["rouge1"].fmeasure == 0.0


@pytest.mark.parametrize(
    ("predictions", "references"),
    [([], []), ([], ["x"]), (["x"], []), (["x", "y"], ["x"])],
)
def test_bad_input_raises(predictions: list[str], references: list[str]) -> None:
    with pytest.raises(ValueError):
        score(predictions, references)


def test_load_metric_missing_raises() -> None:
    with pytest.raises(FileNotFoundError):
        load_metric("no_such_metric")
