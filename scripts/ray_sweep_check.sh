#!/usr/bin/env bash
# Runs a 2-member Hydra sweep (lora.r=2,4) with the ray_local launcher (hydra-ray-launcher) on
# the tiny model, in a virtual environment of its own: the launcher needs cloudpickle < 3 and
# the pinned set (constraints.txt) has 3.1.3, so it cannot share the project's environment.
#
#   scripts/ray_sweep_check.sh [VENV] [WORKDIR]
#
# VENV (default /tmp/lorapipe-ray-venv) is made once: torch 2.13.0, then this checkout with
# the `ray` extra under constraints.txt minus its cloudpickle and joblib pins (about 3 min on
# 2 cores). WORKDIR (default a new temporary folder) gets a copy of the tracked tree, where
# the base, prepare and format stages run on the tiny model before the sweep. Exits non-zero
# unless both members completed; prints summary.md. Output of a run: docs/sweeps-and-scale-out.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-/tmp/lorapipe-ray-venv}
WORK=${2:-$(mktemp -d /tmp/lorapipe-ray-XXXXXX)}
PY="$VENV/bin/python"

if [ ! -f "$VENV/.lorapipe-ray" ]; then
  python3 -m venv "$VENV"
  # The pins minus cloudpickle and joblib: joblib 1.6.0 (pinned) requires cloudpickle >= 3.
  grep -v -E '^(cloudpickle|joblib)==' "$ROOT/constraints.txt" >"$VENV/constraints-ray.txt"
  "$VENV/bin/pip" install --quiet torch==2.13.0
  "$VENV/bin/pip" install --quiet -c "$VENV/constraints-ray.txt" -e "$ROOT[ray]" 'cloudpickle<3'
  touch "$VENV/.lorapipe-ray"
fi
"$PY" -c 'import cloudpickle, ray, hydra_plugins.hydra_ray_launcher as h; print(
    f"ray {ray.__version__}, cloudpickle {cloudpickle.__version__}")'

# A copy of the tracked tree (as on disk), so nothing here touches the checkout's data/models.
mkdir -p "$WORK"
(cd "$ROOT" && git ls-files -z | while IFS= read -r -d '' f; do
  if [ -f "$f" ]; then cp --parents "$f" "$WORK/"; fi
done)
cd "$WORK"
export PYTHONPATH="$WORK/src:$WORK" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TQDM_DISABLE=1
"$PY" -m lorapipe.params model=tiny train.max_steps=4 data.split_counts.train=64 \
  data.split_counts.val=8 data.split_counts.test=8 eval.max_new_tokens=8
for s in base prepare format; do "$PY" -m "stages.$s"; done

# Two Ray tasks of 1 CPU each (the config asks 2 per member, for real runs).
"$PY" -m stages.sweep -m hydra/launcher=ray_local hydra.launcher.ray.remote.num_cpus=1 \
  hydra.sweep.dir=sweeps/ray lora.r=2,4
"$PY" - <<'PYEOF'
import json, pathlib
members = [json.loads(p.read_text()) for p in pathlib.Path("sweeps/ray").glob("*/member.json")]
print(pathlib.Path("sweeps/ray/summary.md").read_text())
assert sorted(m["overrides"][0] for m in members) == ["lora.r=2", "lora.r=4"], members
assert all(m["status"] == "completed" for m in members), members
print(f"ray sweep check: {len(members)} members completed in {pathlib.Path.cwd()}/sweeps/ray")
PYEOF
