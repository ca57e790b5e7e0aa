#!/usr/bin/env bash
# Pack what benchmarks/gpu_train.py needs on a lent GPU machine that has PyTorch but none of
# this project's other libraries and cannot download (docs/training-performance.md, "On a GPU").
#
#   scripts/gpu_kit.sh            # writes .gpukit/ (git-ignored), about 25 MiB
#
# .gpukit/site.tar.gz: the libraries at constraints.txt's versions, installed for CPython
# $PY (3.12, the lent machine's) on manylinux x86-64, without dependencies (the machine's own
# torch, numpy, accelerate, tokenizers, safetensors, pyarrow and pandas are used); of
# bitsandbytes' CUDA libraries only those for CUDA 13 (the machine's torch is built for 13.0).
# .gpukit/base: the base's config, tokenizer and pin, not its weights: the model file is
# larger than what travels, so the GPU script gives that shape random weights (--real-base).
# Needs the base stage's output (`dvc repro base`) and pip's access to the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
KIT=${KIT:-.gpukit}
if [ ! -x .venv/bin/python ]; then
    echo "gpu_kit: no .venv: run \`make setup\` first" >&2
    exit 1
fi
BASE=$(.venv/bin/python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['paths']['base'])")
MAX_MIB=56  # of the 64 MiB a call carries, the rest for the repository itself
PACKAGES="bitsandbytes trl datasets dill multiprocess pydantic pydantic_core annotated-types
typing-inspection transformers peft huggingface_hub httpx2 httpcore2 truststore"

if [ ! -f "$BASE/config.json" ]; then
    echo "gpu_kit: $BASE has no config.json: run \`dvc repro base\` first" >&2
    exit 1
fi
pins=()
for name in $PACKAGES; do
    pin=$(grep -i -E "^${name}==" constraints.txt || true)
    if [ -z "$pin" ]; then
        echo "gpu_kit: constraints.txt pins no $name" >&2
        exit 1
    fi
    pins+=("$pin")
done

rm -rf "$KIT"
mkdir -p "$KIT/base"
for file in "$BASE"/*; do
    case "$file" in *.safetensors | *.bin | *.index.json) continue ;; esac
    cp "$file" "$KIT/base/"
done
.venv/bin/python -m pip install --quiet --no-compile --no-deps --only-binary=:all: --target "$KIT/site" \
    --python-version "$PY" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 "${pins[@]}"
find "$KIT/site/bitsandbytes" -name 'libbitsandbytes_*.so' \
    ! -name 'libbitsandbytes_cuda13*' ! -name 'libbitsandbytes_cpu*' -delete
tar czf "$KIT/site.tar.gz" -C "$KIT" site
rm -rf "$KIT/site"
size=$(du -sm "$KIT" | cut -f1)
if [ "$size" -gt "$MAX_MIB" ]; then
    echo "gpu_kit: $KIT is $size MiB, more than the $MAX_MIB MiB that can travel with the tree" >&2
    exit 1
fi
echo "gpu_kit: $KIT, $size MiB: carry it and run"
echo "  tar xzf $KIT/site.tar.gz -C /tmp && PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_train.py --real-base $KIT/base --out \$OUT/bench_gpu.json"
