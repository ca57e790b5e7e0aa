"""Score generated answers against references: ROUGE-1/2/L/Lsum and exact match.

The metrics are `evaluate` modules shipped in the repository (`metrics/rouge`,
`metrics/exact_match`) and loaded from their local path, so scoring needs no network.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parents[2] / "metrics"

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
METRIC_KEYS = (*ROUGE_KEYS, "exact_match")


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load the metric module `metrics/<name>/<name>.py` shipped in the repository.

    Raises FileNotFoundError if the module file does not exist.
    """
    # Imported here: `import evaluate` takes seconds, and most importers of this module never score.
    import evaluate

    module_dir = METRICS_DIR / name
    if not (module_dir / f"{name}.py").is_file():
        raise FileNotFoundError(f"no metric module {module_dir / (name + '.py')}")
    # A directory holding <name>.py loads via evaluate's local factory: no hub lookup, so offline.
    return evaluate.load(str(module_dir))


@functools.cache
def _cached_metric(name: str) -> evaluate.EvaluationModule:
    # Loading copies and imports the module; compute() with explicit inputs keeps no state
    # between calls, so one instance per process is enough.
    return load_metric(name)


def score(
    predictions: list[str],
    references: list[str],
    *,
    use_stemmer: bool = False,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    regexes_to_ignore: list[str] | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Score each prediction against the reference at the same index.

    ROUGE uses the multilingual tokenizer of `metrics/rouge` (identical to rouge_score's on
    ASCII text; non-Latin scripts are scored too, CJK per character), Porter-stemmed when
    `use_stemmer`. Exact match strips surrounding whitespace and applies the given options.

    Returns `(aggregate, per_example)`: `aggregate` maps rouge1, rouge2, rougeL, rougeLsum and
    exact_match to the mean over examples (ROUGE as F-measure); `per_example` holds one dict
    with the same keys per pair, in input order. The result is deterministic.

    Raises ValueError if the lists are empty or differ in length.
    """
    if not predictions or not references:
        raise ValueError(
            f"cannot score empty input: got {len(predictions)} predictions and "
            f"{len(references)} references"
        )
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} != {len(references)}"
        )

    rouge = _cached_metric("rouge").compute(
        predictions=predictions,
        references=references,
        rouge_types=list(ROUGE_KEYS),
        use_aggregator=False,
        use_stemmer=use_stemmer,
        multilingual=True,
    )
    exact = _cached_metric("exact_match").compute(
        predictions=predictions,
        references=references,
        ignore_case=ignore_case,
        ignore_punctuation=ignore_punctuation,
        regexes_to_ignore=regexes_to_ignore,
        use_aggregator=False,
    )
    if rouge is None or exact is None:  # compute() returns None only on non-main processes
        raise RuntimeError("metric computation returned no result")

    columns: dict[str, list[float]] = {key: list(rouge[key]) for key in ROUGE_KEYS}
    columns["exact_match"] = list(exact["exact_match"])
    per_example = [
        {key: float(columns[key][i]) for key in METRIC_KEYS} for i in range(len(predictions))
    ]
    # The plain mean of per-example F-measures equals rouge_score's BootstrapAggregator "mid"
    # up to bootstrap noise; the mean is chosen because it is deterministic.
    aggregate = {key: sum(col) / len(col) for key, col in columns.items()}
    return aggregate, per_example
