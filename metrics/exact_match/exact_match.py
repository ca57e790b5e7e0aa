"""Exact-match metric as an `evaluate` module, with optional normalisations.

Structured like Hugging Face's `evaluate/metrics/exact_match/exact_match.py`. Ships inside the
repository so it loads from a local path with no network.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Any

import datasets
import evaluate

_CITATION = ""

_DESCRIPTION = """\
Returns the rate at which a prediction equals its reference, as a float in [0, 1], after
optional normalisation. Both strings are always stripped of leading and trailing whitespace.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted strings.
    references: list of reference strings, one per prediction.
    regexes_to_ignore: list of regular expressions whose matches are removed from both strings
        before anything else, applied in order. Default None.
    ignore_case: compare case-insensitively (str.casefold). Default False.
    ignore_punctuation: remove ASCII punctuation (string.punctuation) and every Unicode
        punctuation character (category P*). Default False.
    ignore_whitespace: collapse every run of whitespace into one space. Default False; leading
        and trailing whitespace is stripped either way.
    use_aggregator: if True (default), return the mean; if False, return one 0.0/1.0 per example.
Returns:
    {"exact_match": float} or {"exact_match": list[float]}.
Examples:
    >>> exact_match = evaluate.load("metrics/exact_match")
    >>> exact_match.compute(predictions=["ABC", " x "], references=["abc", "x"])
    {'exact_match': 0.5}
"""

_WHITESPACE_RE = re.compile(r"\s+")


def _strip_punctuation(text: str) -> str:
    return "".join(
        c for c in text if c not in string.punctuation and unicodedata.category(c)[0] != "P"
    )


def normalize(
    text: str,
    regexes_to_ignore: list[str] | None = None,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_whitespace: bool = False,
) -> str:
    """Return `text` normalised as the exact-match comparison sees it."""
    for pattern in regexes_to_ignore or []:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.casefold()
    if ignore_punctuation:
        text = _strip_punctuation(text)
    if ignore_whitespace:
        text = _WHITESPACE_RE.sub(" ", text)
    return text.strip()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):  # type: ignore[misc]  # evaluate ships no type hints
    """Exact string match after optional normalisation."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string", id="sequence"),
                    "references": datasets.Value("string", id="sequence"),
                }
            ),
            reference_urls=[],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        regexes_to_ignore: list[str] | None = None,
        ignore_case: bool = False,
        ignore_punctuation: bool = False,
        ignore_whitespace: bool = False,
        use_aggregator: bool = True,
    ) -> dict[str, Any]:
        matches = [
            float(
                normalize(p, regexes_to_ignore, ignore_case, ignore_punctuation, ignore_whitespace)
                == normalize(
                    r, regexes_to_ignore, ignore_case, ignore_punctuation, ignore_whitespace
                )
            )
            for p, r in zip(predictions, references, strict=True)
        ]
        if not use_aggregator:
            return {"exact_match": matches}
        return {"exact_match": sum(matches) / len(matches) if matches else 0.0}
