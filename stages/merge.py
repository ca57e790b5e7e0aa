"""Stage `merge`: fold the adapter into the base and check merged logits match base+adapter.

python -m stages.merge merge.dtype=bfloat16 merge.max_logit_diff=0.05
"""

from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import Params
from lorapipe.io import atomic_dir, read_jsonl, write_json
from lorapipe.lineage import LINEAGE_FILE
from lorapipe.merging import merge_adapter


def run(params: Params) -> None:
    paths = params.paths
    probes = read_jsonl(Path(paths.formatted) / "test.jsonl")[: params.merge.probe_examples]
    with atomic_dir(Path(paths.merged)) as out:
        report = merge_adapter(
            Path(paths.base),
            Path(paths.adapter),
            out,
            dtype=params.merge.dtype,
            probe_prompts=[ex["prompt"] + ex["completion"] for ex in probes],
            max_logit_diff=params.merge.max_logit_diff,
        )
        (out / LINEAGE_FILE).write_bytes((Path(paths.adapter) / LINEAGE_FILE).read_bytes())
    write_json(Path(paths.reports) / "merge.json", report)
    print(
        f"merge: largest logit difference {report['merged_max_abs_logit_diff']:.3g} "
        f"-> {paths.merged}"
    )


main = stage(run)

if __name__ == "__main__":
    main()
