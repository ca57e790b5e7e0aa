"""ROUGE metric as an `evaluate` module, with a tokenizer that also scores non-Latin text.

Structured like Hugging Face's `evaluate/metrics/rouge/rouge.py` and built on Google's
`rouge_score`. Ships inside the repository so it loads from a local path with no network.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Any

import datasets
import evaluate
from nltk.stem import porter
from rouge_score import rouge_scorer, scoring

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    url = "https://www.aclweb.org/anthology/W04-1013",
    pages = "74--81",
}
"""

_DESCRIPTION = """\
ROUGE (Recall-Oriented Understudy for Gisting Evaluation) compares a prediction against one or
more references by n-gram overlap (rouge1, rouge2), longest common subsequence (rougeL) and
summary-level LCS over newline-separated sentences (rougeLsum). This wraps Google's
`rouge_score`. With `multilingual=True` (the default) text is tokenized so that non-Latin
scripts are scored too: rouge_score's own tokenizer keeps only [a-z0-9], so Chinese or Russian
text becomes empty and scores 0. On pure ASCII text both tokenizers give identical tokens.
"""

_KWARGS_DESCRIPTION = """
Calculates ROUGE scores for a list of predictions against references.
Args:
    predictions: list of predictions to score, one string each.
    references: list of references, one string (or a list of strings) per prediction.
    rouge_types: list of rouge types to compute, default
        `["rouge1", "rouge2", "rougeL", "rougeLsum"]`. "rougeLsum" splits text on newlines.
    use_aggregator: if True, return the bootstrap-aggregated mid F-measure per type; if False,
        return a list with one F-measure per example.
    use_stemmer: apply the Porter stemmer to Latin (ASCII) words longer than 3 characters.
    tokenizer: optional callable `str -> list[str]`; overrides `multilingual` and `use_stemmer`.
    multilingual: if True (default), tokenize with Unicode-aware word splitting and one token
        per CJK character; if False, use rouge_score's default tokenizer.
Returns:
    dict mapping each rouge type to a float (aggregated) or a list of floats (per example).
Examples:
    >>> rouge = evaluate.load("metrics/rouge")
    >>> rouge.compute(predictions=["hello there"], references=["hello there"])
    {'rouge1': 1.0, 'rouge2': 1.0, 'rougeL': 1.0, 'rougeLsum': 1.0}
"""

DEFAULT_ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]

# Han (incl. extensions and compatibility ideographs), Hiragana, Katakana, Hangul. These scripts
# do not separate words with spaces, so each character is one token.
_CJK_RANGES = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x3130, 0x318F),  # Hangul Compatibility Jamo
    (0x31F0, 0x31FF),  # Katakana Phonetic Extensions
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xA960, 0xA97F),  # Hangul Jamo Extended-A
    (0xAC00, 0xD7AF),  # Hangul Syllables
    (0xD7B0, 0xD7FF),  # Hangul Jamo Extended-B
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0xFF66, 0xFF9F),  # Halfwidth Katakana
    (0x20000, 0x2FA1F),  # CJK Extensions B-F and Compatibility Supplement
    (0x30000, 0x323AF),  # CJK Extensions G-H
)

_ASCII_WORD_RE = re.compile(r"^[a-z0-9]+$")


def is_cjk(char: str) -> bool:
    """Return True if `char` is a Han, Hiragana, Katakana or Hangul character."""
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def _is_word_char(char: str) -> bool:
    # `\w` without the underscore (rouge_score splits "a_b" into "a", "b"), plus combining marks
    # so that e.g. Devanagari vowel signs do not split a word in two.
    return char.isalnum() or unicodedata.category(char)[0] == "M"


class MultilingualTokenizer:
    """Tokenizer with rouge_score's `tokenize(text)` interface that keeps non-Latin words.

    Lower-cases, splits on non-word characters (Unicode-aware) and emits one token per CJK
    character. On pure ASCII input the tokens equal rouge_score's DefaultTokenizer, with or
    without the stemmer.
    """

    def __init__(self, use_stemmer: bool = False) -> None:
        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        """Return the tokens of `text`."""
        tokens: list[str] = []
        word: list[str] = []
        for char in text.lower():
            if is_cjk(char):
                if word:
                    tokens.append("".join(word))
                    word = []
                tokens.append(char)
            elif _is_word_char(char):
                word.append(char)
            elif word:
                tokens.append("".join(word))
                word = []
        if word:
            tokens.append("".join(word))
        if self._stemmer is not None:
            # Same rule as rouge_score: stem only words longer than 3 characters, and only ASCII
            # ones, as the Porter stemmer is for English.
            stemmer = self._stemmer
            tokens = [
                stemmer.stem(t) if len(t) > 3 and _ASCII_WORD_RE.match(t) else t for t in tokens
            ]
        return [t for t in tokens if t]


class CallableTokenizer:
    """Wraps a callable `str -> list[str]` into an object with a `tokenize` method."""

    def __init__(self, tokenizer_func: Callable[[str], list[str]]) -> None:
        self.tokenizer_func = tokenizer_func

    def tokenize(self, text: str) -> list[str]:
        """Return `tokenizer_func(text)`."""
        return self.tokenizer_func(text)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):  # type: ignore[misc]  # evaluate ships no type hints
    """ROUGE-1/2/L/Lsum F-measures via rouge_score, optionally with multilingual tokenization."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str] | list[list[str]],
        rouge_types: list[str] | None = None,
        use_aggregator: bool = True,
        use_stemmer: bool = False,
        tokenizer: Callable[[str], list[str]] | None = None,
        multilingual: bool = True,
    ) -> dict[str, Any]:
        if rouge_types is None:
            rouge_types = list(DEFAULT_ROUGE_TYPES)

        multi_ref = isinstance(references[0], list)

        tok: CallableTokenizer | MultilingualTokenizer | None
        if tokenizer is not None:
            tok = CallableTokenizer(tokenizer)
        elif multilingual:
            tok = MultilingualTokenizer(use_stemmer=use_stemmer)
        else:
            tok = None  # rouge_score's DefaultTokenizer
        scorer = rouge_scorer.RougeScorer(
            rouge_types=rouge_types, use_stemmer=use_stemmer, tokenizer=tok
        )

        scores: list[dict[str, scoring.Score]] = []
        aggregator = scoring.BootstrapAggregator() if use_aggregator else None
        for ref, pred in zip(references, predictions, strict=True):
            score = scorer.score_multi(ref, pred) if multi_ref else scorer.score(ref, pred)
            if aggregator is not None:
                aggregator.add_scores(score)
            else:
                scores.append(score)

        result: dict[str, Any] = {}
        if aggregator is not None:
            for key, agg in aggregator.aggregate().items():
                result[key] = float(agg.mid.fmeasure)
        else:
            for key in rouge_types:
                result[key] = [float(s[key].fmeasure) for s in scores]
        return result
