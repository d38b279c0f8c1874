#!/usr/bin/env bash
# Set up modtimeline in ./.venv, then run `demo` or `test` (or nothing).
#
#   bash tools/setup.sh demo    # set up, train the demo model, write modtimeline-demo.json
#   bash tools/setup.sh test    # set up (browser too), run the whole test suite: two passes,
#                               # compiled parts, then `-m twin` on the pure-Python twins
#   bash tools/setup.sh test -m "not slow"   # extra arguments go to both pytest passes
#
# torch: a machine with an NVIDIA GPU gets the default (CUDA) build; any other machine
# gets a CPU build: a local CPU wheel when pip's find-links has one, else PyTorch's CPU
# index. It never pulls gigabytes of CUDA packages onto a CPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
action="${1:-}"
venv="${MODTIMELINE_VENV:-.venv}"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install torch
  elif "${pip[@]}" download --no-index --no-deps "torch==2.13.0" -d "$(mktemp -d)" >/dev/null 2>&1; then
    # pip's find-links holds a CPU wheel: plain `pip install` takes it.
    "${pip[@]}" install "torch==2.13.0"
  else
    "${pip[@]}" install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi
# Without build isolation, so setup.py sees this venv's torch and compiles the recording
# hot path (modtimeline.native._hotpath) against it; setuptools >= 68 for that build.
"${pip[@]}" install "setuptools>=68" wheel
"${pip[@]}" install --no-build-isolation -e ".[test]"
"$venv/bin/python" -c "import modtimeline.native._hotpath" 2>/dev/null \
  || echo "note: the compiled hot path was not built; modtimeline runs on its pure-Python path" >&2

if [ "$action" = "test" ] && [ ! -x /usr/bin/chromium ]; then
  # The Perfetto UI test drives Debian's chromium (playwright's own download is not used).
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

case "$action" in
  demo) exec "$venv/bin/modtimeline" demo ;;
  test)
    # Two passes, both always run and both reported; the run fails if either fails.
    # 1. the whole suite on the compiled parts; 2. the tests marked `twin` (those that
    # record and resolve) on the pure-Python twins of the compiled parts.
    status=0
    "$venv/bin/python" -m pytest -q "${@:2}" || status=1
    echo "== pass 1 (compiled parts): $([ $status = 0 ] && echo passed || echo FAILED)"
    twin=0
    MODTIMELINE_PURE_PYTHON=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider -m twin "${@:2}" || twin=1
    echo "== pass 2 (pure-Python twins, -m twin): $([ $twin = 0 ] && echo passed || echo FAILED)"
    exit $(( status | twin )) ;;
  "") echo "set up in $venv" ;;
  *) echo "usage: bash tools/setup.sh [demo|test]" >&2; exit 2 ;;
esac
