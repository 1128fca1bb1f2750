# Shared set-up of the device scripts (.ci/device-bench, .ci/device-presets), sourced from the project root: the
# wheels carried in .whl/, $OUT, `step NAME SECONDS COMMAND...`, and the machine's description in $OUT/machine.txt.
set -u
OUT=${OUT:-/tmp/device-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "pip could not install .whl"; exit 2; }
fi

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log to $OUT/NAME.txt, print its tail
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  echo "== $name (limit $limit s): $*"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  status=$?
  echo "   exit $status after $((SECONDS - start)) s"
  tail -n 40 "$OUT/$name.txt"
}

python3 -c "import omegaconf, gymnasium, crafter, nle" \
  || { echo "missing packages: run ../shared/gpu/wheels.sh omegaconf here and carry .whl"; exit 2; }
{ nvidia-smi; nproc; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/machine.txt" 2>&1
head -n 20 "$OUT/machine.txt"
