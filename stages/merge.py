"""Stage `merge`: fold the adapter into the base and check merged logits match base+adapter.

python -m stages.merge merge.dtype=bfloat16                 # bound: 0.05 x the largest logit
python -m stages.merge merge.push_to_hub=true merge.hub_repo_id=me/model merge.push_dry_run=true
python -m stages.merge 'merge.gguf=[f16,q8_0]'   # also GGUF files + Ollama Modelfiles, read back

Time and peak memory go to reports/runtime/merge.json, not to reports/merge.json (a DVC
metric, identical across identical runs).
"""

import time
from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import Params
from lorapipe.hub import describe_plan, push_folder, push_token
from lorapipe.io import atomic_dir, read_jsonl, write_json
from lorapipe.lineage import (
    CARD_FILE,
    LINEAGE_FILE,
    model_card,
    require_adapter,
    require_trained_on,
    require_trained_with,
)
from lorapipe.models import check_merge_dtype, require_base
from lorapipe.runtime import peak_rss_mib, write_runtime


def run(params: Params) -> None:
    # Imported here, after the config is validated: torch takes seconds to import on 2 busy
    # cores, and a typo in params should be reported before that.
    from lorapipe.gguf_export import (
        check_before_merge,
        export_checked,
        gguf_lineage,
        model_name,
        trained_system_prompt,
    )
    from lorapipe.merging import merge_adapter, merged_lineage

    paths, cfg = params.paths, params.merge
    # A push without a token fails now, not after minutes of merging (the repo id is checked
    # with the config). The token stays in this variable: never in a file, report or message.
    token = push_token() if cfg.push_to_hub and not cfg.push_dry_run else None
    # These read only small files and the adapter weights' header, so a bad merge.dtype or a
    # pickled, truncated or unreadable adapter stops before loading.
    require_base(params.model, Path(paths.base))
    check_merge_dtype(Path(paths.base), params.merge.dtype)
    require_adapter(Path(paths.adapter))
    require_trained_on(Path(paths.adapter), Path(paths.base))
    require_trained_with(Path(paths.adapter), params)
    if cfg.gguf:
        check_before_merge(Path(paths.base))
        system_prompt = trained_system_prompt(Path(paths.adapter))
    probes = read_jsonl(Path(paths.formatted) / "test.jsonl")[: params.merge.probe_examples]
    prompts = [ex["prompt"] + ex["completion"] for ex in probes]
    started = time.perf_counter()
    gguf_seconds = 0.0
    with atomic_dir(Path(paths.merged)) as out:
        report = merge_adapter(
            Path(paths.base),
            Path(paths.adapter),
            out,
            dtype=params.merge.dtype,
            probe_prompts=prompts,
            max_logit_diff=cfg.max_logit_diff,
            max_shard_size=cfg.max_shard_size,
        )
        lineage = merged_lineage(Path(paths.adapter), report)
        if cfg.gguf:  # a file that fails its read-back raises: nothing of this run is kept
            report["gguf"], gguf_seconds = export_checked(
                out,
                cfg.gguf,
                name=model_name(lineage["base_model"]["name"]),
                probe_prompts=prompts,
                system_prompt=system_prompt,
            )
            lineage["merge"]["gguf"] = gguf_lineage(report["gguf"])
        write_json(out / LINEAGE_FILE, lineage)
        (out / CARD_FILE).write_text(model_card(lineage), encoding="utf-8")  # the hub's page
    seconds = time.perf_counter() - started
    reports = Path(paths.reports)
    write_json(reports / "merge.json", report)
    facts = {"seconds": round(seconds, 2), "peak_rss_mib": round(peak_rss_mib(), 1)}
    if cfg.gguf:
        facts["gguf_seconds"] = round(gguf_seconds, 2)
    write_runtime(reports, "merge", {**facts, "dtype": cfg.dtype})
    print(
        f"merge: largest logit difference {report['merged_max_abs_logit_diff']:.3g} "
        f"(allowed {report['max_logit_diff_allowed']:.3g}) -> {paths.merged}; "
        f"{facts['seconds']} s, peak {facts['peak_rss_mib']} MiB"
    )
    for gguf_type, g in report.get("gguf", {}).items():
        print(
            f"merge: {g['file']} read back: largest logit difference "
            f"{g['max_abs_logit_diff']:.3g} (allowed {g['max_logit_diff_allowed']:.3g} for "
            f"{gguf_type}); `ollama create NAME -f {Path(paths.merged) / g['modelfile']}`"
        )
    if cfg.push_dry_run:
        print(describe_plan(Path(paths.merged), str(cfg.hub_repo_id)))
    elif token is not None:
        url = push_folder(
            Path(paths.merged), str(cfg.hub_repo_id), token=token, private=cfg.hub_private
        )
        print(f"merge: pushed {paths.merged} to {url}")


main = stage(run)

if __name__ == "__main__":
    main()
