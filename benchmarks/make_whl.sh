#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU machine lacks, so no device time is spent
# building: a PyCUDA 2026.1 wheel for CPython 3.12 built HERE against a stub libcuda.so.1
# (it loads the real driver there: verified on driver 580.159.04), its pure-Python
# dependencies, and the project's runtime dependencies missing from the GPU image.
# Needs: nvcc (CUDA 13.0), gcc, a Python 3.12 (pyenv's by default), the workplace's
# ../shared/gpu scripts, and registry access. About 2 minutes.
#   bash benchmarks/make_whl.sh            then: device run, carry [".whl"],
#   bash benchmarks/gpu_session.sh         (sources benchmarks/gpu_env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-$(command -v python3.12 >/dev/null && python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null \
                 || ls -d /root/.pyenv/versions/3.12.*/bin/python3.12 2>/dev/null | tail -1)}
[ -x "$PY312" ] || { echo "make_whl: no Python 3.12 found; set PY312=" >&2; exit 1; }
SHARED=${SHARED:-../shared/gpu}
[ -f "$SHARED/build-pycuda.sh" ] || { echo "make_whl: $SHARED/build-pycuda.sh not found; set SHARED=" >&2; exit 1; }
WORK=$(mktemp -d /tmp/make-whl.XXXX)
trap 'rm -rf "$WORK"' EXIT

bash "$SHARED/fetch-pycuda.sh" .whl >/dev/null
# the linker only needs a library named libcuda.so.1 to record; symbols resolve on the GPU
echo 'void synapse_libcuda_stub(void) {}' > "$WORK/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$WORK/libcuda.so.1" "$WORK/stub.c"
"$PY312" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q numpy setuptools wheel markupsafe typing_extensions
WHL=.whl TARGET="$WORK/site" PY="$WORK/venv/bin/python" LIBCUDA="$WORK/libcuda.so.1" \
  KEEP_WHEEL_DIR=.whl bash "$SHARED/build-pycuda.sh" 2>&1 | grep -v "^WARNING" | tail -2 || true
ls .whl/pycuda-*-cp312-*.whl >/dev/null || { echo "make_whl: the PyCUDA wheel was not built" >&2; exit 1; }
rm -f .whl/pycuda-*.tar.gz  # gpu_env.sh installs .whl/*.whl only; the sdist is not needed there
# runtime and test dependencies the GPU image does not have (it has torch, numpy,
# transformers, accelerate, cuda-bindings); optimum-quanto and hqq (+ termcolor, einops)
# for transformers' QuantizedCache in benchmarks/hf_caches.py
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl simpy plotly narwhals click pyyaml tqdm hypothesis sortedcontainers optimum-quanto \
  termcolor einops prometheus-client
# hqq ships an sdist only; built without its CUDA kernels (the KV-cache path does not use them)
DISABLE_CUDA=1 python3 -m pip wheel -q --no-deps -w .whl hqq==0.2.8.post1
ls -la .whl
