# Source this at the start of every command on the GPU machine (the device tool runs in a
# copy of the repository with .whl/ carried): installs the carried wheels (PyCUDA built
# for cp312, simpy, plotly, ...) into /tmp/site and puts the checkout on the path.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
