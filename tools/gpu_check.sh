#!/usr/bin/env bash
# Every GPU check, in one run on a machine with an NVIDIA GPU and a CUDA torch already
# installed (no package registry needed): wheels of orjson/perfetto/protobuf carried in
# ./.whl are installed beside it, the compiled parts are built against its torch, then
# the parts named run (all by default). Logs and results go to $OUT (else
# /tmp/gpu-check): check.log, slow.log, results.tar.gz (reporters' tables and JSON) and
# traces.tar (the Llama traces, gzipped).
#
#   bash tools/gpu_check.sh                    # tests slow llama marks bench suite (~6 min on an H200)
#   bash tools/gpu_check.sh tests llama marks  # some of them
#
# Parts: tests (tests/test_cuda.py but its two-minute test), slow (that one, in the
# background), llama (benchmarks/gpu_llama.py), marks (benchmarks/gpu_marks.py), bench
# (benchmarks/gpu.py), suite (the tests that behave differently where CUDA is available).
#
# Wheels (here, where pip works, for the GPU machine's Python 3.12):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl orjson perfetto protobuf
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out/results" "$out/traces"
parts=" ${*:-tests slow llama marks bench suite} "
want() { [[ "$parts" == *" $1 "* ]]; }
python=python3
exec > >(tee "$out/check.log") 2>&1
stamp() { echo "== $(date +%T) $*"; }

stamp "machine"
nvidia-smi -L
$python -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
if [ -d .whl ]; then
  wheels=(.whl/orjson-*.whl .whl/perfetto-*.whl)
  # protobuf only where the machine's is older than ours needs (>= 6.31.1)
  $python -c "import google.protobuf as p, sys; v = tuple(map(int, p.__version__.split('.')[:2])); sys.exit(v < (6, 31))" \
    || wheels+=(.whl/protobuf-*.whl)
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

stamp "build the compiled parts against this torch"
$python setup.py -q build_ext --inplace -j 16 >"$out/results/build.log" 2>&1 || tail -20 "$out/results/build.log"
$python - <<'PY'
from modtimeline.native import loader
from modtimeline.capture.recorder import native_hotpath
from modtimeline.device.clock import CUDA_MARKS_API
marks = loader.compiled_part("native._cuda_marks", CUDA_MARKS_API) is not None
print("compiled hot path:", native_hotpath() is not None, "| compiled device marks:", marks,
      "| not loaded:", dict(loader.why_not) or "none")
PY

pytest=($python -m pytest -q -p no:cacheprovider -rfEs)
failed=""  # the parts that failed: the exit status says so (1), not only the log
slow=""
if want slow; then
  stamp "the two-minute GPU test, in the background"
  "${pytest[@]}" tests/test_cuda.py -k two_minutes >"$out/slow.log" 2>&1 &
  slow=$!
fi
if want tests; then
  stamp "tests/test_cuda.py"
  "${pytest[@]}" tests/test_cuda.py -k "not two_minutes" || failed+=" tests"
fi
if want llama; then
  stamp "benchmarks/gpu_llama.py --size bound"
  $python benchmarks/gpu_llama.py --size bound --out "$out/results" --keep "$out/traces" || failed+=" llama"
  stamp "benchmarks/gpu_llama.py --size small"
  $python benchmarks/gpu_llama.py --size small --out "$out/results" || failed+=" llama-small"
fi
if want marks; then
  stamp "benchmarks/gpu_marks.py"
  $python benchmarks/gpu_marks.py --out "$out/results" || failed+=" marks"
fi
if want bench; then
  stamp "benchmarks/gpu.py"
  $python benchmarks/gpu.py --out "$out/results" ${BENCH_ARGS:-} || failed+=" bench"
fi
if want suite; then
  stamp "the suite's tests that behave differently where CUDA is available (parallel)"
  # (SIGINT at the limit: pytest still prints which tests failed so far)
  timeout -s INT "${SUITE_TIMEOUT:-240}" "${pytest[@]}" --tb=line -n 12 -m "not browser" tests/test_clock.py tests/test_nvtx.py tests/test_profiler.py \
    tests/test_merge.py tests/test_inductor_detail.py tests/test_compile.py tests/test_cli.py tests/test_timeline.py \
    tests/test_hotpath.py tests/test_real_models.py tests/test_threads.py tests/test_faults.py || failed+=" suite"
fi
if [ -n "$slow" ]; then
  stamp "waiting for the two-minute test"
  wait $slow || failed+=" slow"
  tail -5 "$out/slow.log"
fi
tar -czf "$out/results.tar.gz" -C "$out" results && rm -rf "$out/results"
tar -cf "$out/traces.tar" -C "$out" traces && rm -rf "$out/traces"
stamp "done; failed:${failed:- none}"
[ -z "$failed" ]
