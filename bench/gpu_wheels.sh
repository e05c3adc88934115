#!/usr/bin/env bash
# Downloads the wheels that bench/gpu.sh installs on the GPU machine (Python 3.12, manylinux x86-64, no
# network there) into .gpu-wheels/ (git-ignored), then prints the `carry` list and what travels.
#
#   bench/gpu_wheels.sh
#
# The image (bench/gpu_image_packages.txt) has torch, transformers, tokenizers, accelerate, peft,
# sentence-transformers, huggingface-hub, safetensors, numpy, scipy, tqdm, pyyaml, pandas, pyarrow, xxhash,
# fsspec, onnx and onnxruntime; it lacks datasets (textcl's data loading, and sentence-transformers' trainer)
# with its dill and multiprocess, faiss-cpu (mining, evaluation, search), and bm25s with PyStemmer (hybrid
# search). Nothing else of textcl's core dependencies is missing (bench/gpu_requirements.py checks that).
# Output, 2026-12: 6 wheels, 19.6 MiB (faiss-cpu 18.0 of it) + the tree, about 2 MiB: under 22 of the 64 MiB.
set -eu
cd "$(dirname "$0")/.."
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 faiss-cpu==1.15.1 bm25s==0.3.16 PyStemmer==3.1.0)
mkdir -p .gpu-wheels
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu-wheels "${WHEELS[@]}"
# keep exactly these versions: two versions of one package stop the install on the GPU machine
for file in .gpu-wheels/*.whl; do
  keep=0
  for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}; version=${spec##*==}
    base=$(basename "$file" | tr '[:upper:]' '[:lower:]'); wanted=$(echo "${name//-/_}" | tr '[:upper:]' '[:lower:]')
    case "$base" in "$wanted-$version-"*) keep=1 ;; esac
  done
  [ $keep = 1 ] || { echo "removing $(basename "$file") (not in the list)"; rm -f "$file"; }
done
mib() { awk '{printf "%.1f", $1 / 1048576}'; }
wheels=$(du -cb .gpu-wheels/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z 2>/dev/null | du --files0-from=- -cb 2>/dev/null | tail -1 | cut -f1)
tree=${tree:-0}
ls -l .gpu-wheels/*.whl | awk '{printf "  %6.1f MiB  %s\n", $5 / 1048576, $9}'
echo "carry: [\".gpu-wheels\"]"
echo "wheels $(echo "$wheels" | mib) MiB + tree $(echo "$tree" | mib) MiB = $(echo $((wheels + tree)) | mib) MiB of 64 MiB"
