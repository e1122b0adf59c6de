#!/usr/bin/env bash
# llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity), the peer that
# benchmarks/vs_llamacpp.py measures against: built once from the llama.cpp sources inside the pinned
# llama-cpp-python sdist (PyPI), into a cache folder outside the repository, and reused afterwards.
#
#   bash scripts/llama_tools.sh                      # prints the folder holding the tools (builds them the first time)
#   bash scripts/llama_tools.sh --allocator REPO     # llama.cpp's per-tensor allocator (llama-quantize --target-size,
#                                                    # and its branch's llama-imatrix), from branch `quantize` of a
#                                                    # clone of EAddario/llama.cpp (the search tool's fetch brings one)
#
# Tools already on PATH are used instead (all three must be there). The cache folder is
# $AUTOSQUASH_TOOLS, else ~/.cache/autosquash/llama.cpp-<llama-cpp-python version> (the allocator's:
# ~/.cache/autosquash/llama.cpp-allocator-<commit>). Built for any x86-64 with AVX2 (GGML_NATIVE=OFF, as
# scripts/setup.sh builds llama-cpp-python), about 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

# build SRC BIN WORK TOOL...: the tools built from the llama.cpp sources in SRC (in WORK), copied into BIN whole.
build() {
  local src=$1 bin=$2 work=$3
  shift 3
  for need in cmake c++ ninja; do
    command -v "$need" >/dev/null 2>&1 || { echo "llama_tools: $need is needed to build llama.cpp" >&2; exit 1; }
  done
  echo "llama_tools: building $* (about 15 minutes on 2 cores)" >&2
  cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >&2
  cmake --build "$work/build" --target "$@" -j "$(nproc)" >&2
  mkdir -p "$bin.tmp"
  for t in "$@"; do cp "$work/build/bin/$t" "$bin.tmp/"; done
  rm -rf "$bin" && mv "$bin.tmp" "$bin"
}

built() {  # built BIN TOOL...: whether every tool is in BIN
  local bin=$1
  shift
  for t in "$@"; do [ -x "$bin/$t" ] || return 1; done
}

if [ "${1:-}" = "--allocator" ]; then
  repo=${2:?"llama_tools: --allocator needs a clone of EAddario/llama.cpp"}
  commit=$(git -C "$repo" rev-parse --short quantize) || { echo "llama_tools: $repo has no branch quantize" >&2; exit 1; }
  bin="$HOME/.cache/autosquash/llama.cpp-allocator-$commit/bin"
  tools=(llama-quantize llama-imatrix)
  if built "$bin" "${tools[@]}"; then echo "$bin"; exit 0; fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir "$work/src"
  # Only what the build reads: some large files under models/ are absent from a snapshot.
  git -C "$repo" archive quantize CMakeLists.txt cmake ggml src include common tools vendor licenses app \
    | tar -x -C "$work/src"
  build "$work/src" "$bin" "$work" "${tools[@]}"
  echo "$bin"
  exit 0
fi

tools=(llama-quantize llama-imatrix llama-perplexity)
if command -v "${tools[@]}" >/dev/null 2>&1; then
  dirname "$(command -v llama-quantize)"
  exit 0
fi
version=$(sed -n 's/^llama-cpp-python==//p' constraints.txt)
[ -n "$version" ] || { echo "llama_tools: no llama-cpp-python pin in constraints.txt" >&2; exit 1; }
cache="${AUTOSQUASH_TOOLS:-$HOME/.cache/autosquash/llama.cpp-$version}"
bin="$cache/bin"
if built "$bin" "${tools[@]}"; then echo "$bin"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "llama_tools: fetching the llama-cpp-python $version sdist" >&2
python=.venv/bin/python
[ -x "$python" ] || python=python3
"$python" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { echo "llama_tools: no llama.cpp sources in the sdist ($src)" >&2; exit 1; }
build "$src" "$bin" "$work" "${tools[@]}"
echo "$bin"
