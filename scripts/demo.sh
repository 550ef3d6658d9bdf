#!/usr/bin/env bash
# The demo command: set up, build, and run `carewall demo` (the gateway in
# front of a built-in replay upstream). Extra arguments go to `carewall demo`.
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.cache/onnxruntime/libonnxruntime.so}"
args=("$@")
if [ ! -f models/carewall-safety/model.onnx ] && [[ " ${args[*]-} " != *" --classifier "* ]]; then
  echo "demo: models/carewall-safety/model.onnx is not here; using the keyword stand-in classifier"
  args+=(--classifier keyword)
fi
exec cargo run --release -- demo "${args[@]}"
