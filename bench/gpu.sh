#!/usr/bin/env bash
# The GPU check: one command, about 7 minutes on one H100, no network (see README "Many processes").
#
#   bench/gpu_wheels.sh                  # here, with PyPI: the wheels the GPU image lacks, into .gpu-wheels/
#   bench/gpu.sh                         # on the GPU machine, from the repository root, with .gpu-wheels carried
#   bench/gpu.sh --only encode,proofs    # rerun some steps (install and models always run first)
#   bench/gpu.sh --dry-run               # on a CPU (CI): every step with tiny models, nothing timed
#
# Writes $OUT/gpu.log (everything printed), $OUT/gpu.json (every figure, merged in as each is measured; see
# bench/gpu_report.py) and $OUT/proofs.xml (pytest). Without $OUT: bench/gpu-out/. Each step has its own time
# limit, and all steps share a budget of TEXTCL_GPU_BUDGET seconds (default 460), so the run ends inside
# 8 minutes; a step that fails or times out is recorded and the next one runs.
#
# Steps, in order, with their limits (seconds):
#   install 60    the carried wheels, then textcl from this tree, into $WORK/site (pip --no-index --no-deps)
#   env 30        versions, GPU, onnxruntime providers, unmet requirements of the carried wheels
#   models 60     random-init all-MiniLM-L6-v2 and bert-base shapes; attention implementation; padding
#   train_fp32_b64 60, train_bf16_b512 60, train_gradcache_b4096 90, train_hardneg 60
#                 textcl vs sentence-transformers: anchors/s and peak GPU memory (bench/gpu_bench.py)
#   encode 75     textcl vs sentence-transformers, batch 256, short sentences and 256-token documents, bf16/fp32
#   proofs 150    pytest: tests/test_multiprocess_gpu.py (DDP and FSDP with one process), bench/gpu_checks.py
#                 (GradCache = full batch, bf16 vs fp32 on CUDA), the kill-and-resume test of test_training.py
#   recipe 60     retrieval-hardneg for 30 steps on SciFact-shaped random data, forward_chunk_size 0
#   onnx 30       textcl's ONNX export on onnxruntime's CUDA provider, when the image has onnxruntime-gpu
#   decoder 90    a Qwen3-0.6B-shaped decoder (last-token pooling): encode and train, textcl vs peer
#   decoder_lora 60  bench/decoder.py: LoRA training and encoding of that shape at batch 32 x 512 tokens
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY=",$2,"; shift ;;
    *) echo "usage: bench/gpu.sh [--dry-run] [--only STEP,STEP]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/bench/gpu-out}
WORK=${TEXTCL_GPU_WORK:-/tmp/textcl-gpu}
BUDGET=${TEXTCL_GPU_BUDGET:-460}
WHEELS=$REPO/.gpu-wheels
REPORT=$OUT/gpu.json
mkdir -p "$OUT" "$WORK"
rm -f "$REPORT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
export PY OUT WORK WHEELS REPORT REPO DRY
START=$SECONDS

# step NAME LIMIT COMMAND...: run COMMAND under min(LIMIT, what is left of the budget); record rc and seconds.
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ $ONLY != *",$name,"* ]] && [ "$name" != install ] && [ "$name" != models ]; then
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ $left -lt 15 ]; then
    echo "=== $name: skipped, the budget of ${BUDGET}s is spent"
    "$PY" bench/gpu_report.py skip "$REPORT" "$name" "not run: the ${BUDGET}s budget was spent"
    return 0
  fi
  [ $limit -gt $left ] && limit=$left
  echo "=== $name (limit ${limit}s) at $(date +%T), $((SECONDS - START))s in"
  local began=$SECONDS
  # timeout signals the whole process group: the step's children (pytest's, accelerate's) end with it
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@"
  local rc=$?
  "$PY" bench/gpu_report.py step "$REPORT" "$name" $rc $((SECONDS - began)) "$limit"
  echo "=== $name: rc $rc in $((SECONDS - began))s"
  return $rc
}

install() {
  # The image lacks these (bench/gpu_wheels.sh); textcl's own pins (torch>=2.13, transformers>=5.24...) are
  # above the image's versions, which textcl runs with, hence --no-deps.
  # The tags name the image's Python, so the dry run checks the very wheels that travel (on another Python).
  local site=$WORK/site offline=(--no-index --no-build-isolation)
  rm -rf "$site"
  # a CI Python without setuptools builds textcl in an isolated environment from PyPI (the image has it)
  [ "$DRY" = 1 ] && ! "$PY" -c "import setuptools" 2>/dev/null && offline=()
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$WHEELS"/*.whl &&
    "$PY" -m pip install -q "${offline[@]}" --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$REPO" &&
    "$PY" bench/gpu_requirements.py "$WHEELS" "$REPORT" --target "$site"
}

proofs() {
  local timeout_flag=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout 140)
  local tests=(tests/test_multiprocess_gpu.py bench/gpu_checks.py
               "tests/test_training.py::test_sigkilled_run_resumes_to_the_same_parameters")
  if [ $DRY = 1 ]; then  # no GPU: prove that they import and are found
    "$PY" -m pytest -q -p no:cacheprovider --collect-only "${tests[@]}" > "$WORK/collected.txt"
    local rc=$?
    "$PY" bench/gpu_report.py collected "$REPORT" proofs "$WORK/collected.txt"
    return $rc
  fi
  "$PY" -m pytest -q -rs -p no:cacheprovider "${timeout_flag[@]}" --junitxml "$OUT/proofs.xml" "${tests[@]}"
  local rc=$?
  "$PY" bench/gpu_report.py junit "$REPORT" proofs "$OUT/proofs.xml"
  return $rc
}

bench() {
  local flags=(--report "$REPORT" --work "$WORK")
  [ "$DRY" = 1 ] && flags+=(--dry_run)
  "$PY" bench/gpu_bench.py "$@" "${flags[@]}"
}
export -f install proofs bench

echo "textcl GPU check: $(git log -1 --format='%h %s' 2>/dev/null), dry run $DRY, budget ${BUDGET}s"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ $DRY = 1 ]; then  # checks that the pinned wheels still download for the image's Python (kept if present)
  bench/gpu_wheels.sh || exit 1
fi
ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in .gpu-wheels/: run bench/gpu_wheels.sh, carry .gpu-wheels"; exit 1; }
step install 60 install
installed=$?
if [ $DRY = 1 ]; then
  [ $installed = 0 ] || { echo "install failed"; exit 1; }
  # The steps run with this machine's packages: the wheels are for Python 3.12 (the image), not for this one.
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  # if textcl itself did not install, the tree's copy still runs (the wheels are what the steps need)
  export PYTHONPATH=$WORK/site:$REPO
  "$PY" -c "import datasets, faiss" || { echo "the carried wheels did not install: nothing else can run"; exit 1; }
fi
# name:limit in seconds, in the order they run (the header above says what each does)
STEPS=(env:30 models:60 train_fp32_b64:60 train_bf16_b512:60 train_gradcache_b4096:90 train_hardneg:60 encode:75
       proofs:150 recipe:60 onnx:30 decoder:90 decoder_lora:60)
if [ $DRY = 1 ]; then  # the measuring steps in one process: a dry run proves code paths, and CI time counts
  names=()
  for entry in "${STEPS[@]}"; do [ "${entry%%:*}" = proofs ] || names+=("${entry%%:*}"); done
  step measuring_steps 600 bench "${names[@]}"
  step proofs 150 proofs
else
  for entry in "${STEPS[@]}"; do
    name=${entry%%:*}
    if [ "$name" = proofs ]; then step proofs "${entry##*:}" proofs; else step "$name" "${entry##*:}" bench "$name"; fi
  done
fi
"$PY" bench/gpu_report.py not-run "$REPORT"
echo "textcl GPU check done in $((SECONDS - START))s: $REPORT"
[ -n "$ONLY" ] || "$PY" bench/gpu_report.py check "$REPORT"
