#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: everything the demo and the tests need.
#   - a project virtual environment `.venv/` (Debian 12's system Python refuses
#     `pip install` outside one, PEP 668); python3-venv is installed when missing;
#   - ONNX Runtime's shared library, taken from the PyPI `onnxruntime` wheel
#     (no CDN download: ort is built with `load-dynamic`);
#   - Python packages the black-box tests use (`openai`, ...), into `.venv/`
#     (only with --tests: the demo needs none);
#   - Debian's Chromium + ChromeDriver for the console's browser test (only with --browser);
#   - Debian's docker-compose and promtool for deploy/check.sh (only with --deploy).
# Safe to run repeatedly; each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.31.1
ORT_DIR=.cache/onnxruntime
ORT_LIB="$ORT_DIR/libonnxruntime.so"

want_browser=0
want_deploy=0
want_tests=0
for a in "$@"; do
  case "$a" in
    --browser) want_browser=1 ;;
    --deploy) want_deploy=1 ;;
    --tests) want_tests=1 ;;
    *) echo "setup.sh: unknown argument '$a' (known: --tests, --browser, --deploy)" >&2; exit 2 ;;
  esac
done

# The project's Python: a venv, so nothing is installed into the system Python.
VENV=.venv
PY="$VENV/bin/python"
if [ ! -x "$PY" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
  rm -rf "$VENV"
  SETUP_PY="${CAREWALL_SETUP_PYTHON:-python3}"
  if ! "$SETUP_PY" -m venv "$VENV" >/dev/null 2>&1; then
    echo "setup: installing Debian python3-venv (python3 -m venv is missing)"
    rm -rf "$VENV"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    "$SETUP_PY" -m venv "$VENV"
  fi
fi

if [ ! -s "$ORT_LIB" ]; then
  echo "setup: fetching libonnxruntime.so from the PyPI wheel onnxruntime==$ORT_VERSION"
  tmp=$(mktemp -d)
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 \
    -d "$tmp" "onnxruntime==$ORT_VERSION"
  whl=$(ls "$tmp"/onnxruntime-*.whl)
  mkdir -p "$ORT_DIR"
  "$PY" - "$whl" "$ORT_DIR" <<'PY'
import sys, zipfile, os
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if "/capi/libonnxruntime.so" in n]
    if not names:
        sys.exit(f"setup: no libonnxruntime.so inside {whl}")
    src = sorted(names, key=len)[-1]
    data = z.read(src)
with open(os.path.join(out, "libonnxruntime.so"), "wb") as f:
    f.write(data)
print(f"setup: wrote {out}/libonnxruntime.so ({len(data)//1024//1024} MiB) from {src}")
PY
  rm -rf "$tmp"
fi

if [ "$want_tests" = 1 ]; then
  "$PY" -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
fi

# Chromium drives the review console's browser test; the CJK font makes its
# screenshot readable (without it Chinese text renders as boxes).
if [ "$want_browser" = 1 ] && { ! command -v chromium >/dev/null 2>&1 \
    || ! command -v chromedriver >/dev/null 2>&1 \
    || [ ! -d /usr/share/fonts/truetype/wqy ]; }; then
  echo "setup: installing Debian chromium, chromium-driver and fonts-wqy-microhei"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-wqy-microhei >/dev/null
fi

# deploy/check.sh validates the compose stack, the Prometheus rules and the
# dashboards without a Docker engine (promtool ships in Debian's prometheus).
if [ "$want_deploy" = 1 ] && { ! command -v promtool >/dev/null 2>&1 \
    || ! command -v docker-compose >/dev/null 2>&1; }; then
  echo "setup: installing Debian prometheus (promtool) and docker-compose"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus docker-compose >/dev/null
fi

echo "setup: done (ORT_DYLIB_PATH=$PWD/$ORT_LIB)"
