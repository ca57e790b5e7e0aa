"""Stage `evaluate`: base model vs adapter on the test split -> ROUGE and exact match.

python -m stages.evaluate eval.max_examples=50 eval.batch_size=16
"""

from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import Params
from lorapipe.evaluation import evaluate_models
from lorapipe.io import read_jsonl, write_json, write_jsonl


def run(params: Params) -> None:
    examples = read_jsonl(Path(params.paths.formatted) / "test.jsonl")
    metrics, predictions = evaluate_models(
        params.eval, Path(params.paths.base), Path(params.paths.adapter), examples
    )
    reports = Path(params.paths.reports)
    write_jsonl(reports / "predictions.jsonl", predictions)
    write_json(reports / "metrics.json", metrics)
    for model, scores in metrics.items():
        if isinstance(scores, dict):
            print(
                f"evaluate: {model}: exact_match {scores['exact_match']:.3f}, "
                f"rougeL {scores['rougeL']:.3f}"
            )


main = stage(run)

if __name__ == "__main__":
    main()
