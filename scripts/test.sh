#!/usr/bin/env bash
# The test command: set up a fresh machine, then lint and run every test.
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --tests --browser --deploy
# The black-box tests and deploy/check.sh use the project's venv (PEP 668).
export CAREWALL_TEST_PYTHON="${CAREWALL_TEST_PYTHON:-$PWD/.venv/bin/python}"
export PATH="$PWD/.venv/bin:$PATH"
if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "test: installing cargo-nextest from crates.io"
  cargo install --locked cargo-nextest
fi
# ONNX Runtime for the classifier tests (load-dynamic).
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.cache/onnxruntime/libonnxruntime.so}"

cargo fmt --check
cargo clippy --all-targets -- -D warnings
# The deployment files (compose, Prometheus rules, dashboards, collector) and
# the gateway's acceptance of the compose environment.
cargo build --bin carewall
bash deploy/check.sh "${CARGO_TARGET_DIR:-target}/debug/carewall"
cargo nextest run --profile ci
