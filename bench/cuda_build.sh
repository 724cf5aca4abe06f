#!/usr/bin/env bash
# Builds hotloop._C against the torch of a given Python, CUDA sources included, into its own build folder,
# and copies the package there (BUILD/pkg/hotloop) so python/hotloop keeps its own build. Needs nvcc, not
# a GPU, and no network or venv: cmake and ninja come from beside that Python or from PATH.
#
#   bench/cuda_build.sh PYTHON BUILD_DIR [--require-cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(command -v "$1") || { echo "no python $1" >&2; exit 2; }
[[ $py == /* ]] || py=$PWD/$py  # absolute, not resolved: a venv's python must stay the venv's
build=$2 require=${3:-}

tool() {  # a build tool installed beside the Python (a venv, a pip install) first, else the one on PATH
  local here
  here="$(dirname "$py")/$1"
  if [[ -x $here ]]; then echo "$here"; else command -v "$1" || { echo "no $1 found" >&2; exit 2; }; fi
}
cmake=$(tool cmake)
ninja=$(tool ninja)
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
echo "python: $py ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
echo "cmake: $cmake; ninja: $ninja; nvcc: ${nvcc:-none}"
args=(-S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DPython_EXECUTABLE=$py"
      "-DCMAKE_MAKE_PROGRAM=$ninja")
[[ -n $nvcc ]] && args+=("-DCMAKE_CUDA_COMPILER=$nvcc")
"$cmake" "${args[@]}" ${CMAKE_ARGS:-} > "$build.configure.log" 2>&1 || { mkdir -p "$build"; cat "$build.configure.log"; exit 1; }
"$cmake" --build "$build"
with_cuda=$(sed -n 's/^WITH_CUDA = \(True\|False\)$/\1/p' "$build/_build_info.py")
echo "built $(ls "$build"/_C*.so) with CUDA: ${with_cuda:-unknown}"
if [[ $require == --require-cuda && $with_cuda != True ]]; then
  echo "no CUDA in this build (torch without CUDA, or no nvcc): see $build.configure.log" >&2
  exit 3
fi
rm -rf "$build/pkg" && mkdir -p "$build/pkg" && cp -r python/hotloop "$build/pkg/"
rm -f "$build"/pkg/hotloop/_C*.so "$build/pkg/hotloop/_build_info.py"
cp "$build"/_C*.so "$build/_build_info.py" "$build/pkg/hotloop/"
