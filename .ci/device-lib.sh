# Shared set-up of the device scripts (.ci/device-bench, .ci/device-presets, .ci/device-checks), sourced from the
# project root: the wheels carried in .whl/ (NO_WHEELS=1: not installed), $OUT, `step NAME SECONDS COMMAND...`, and
# the machine's description.
# LOGS (default $OUT) is where each step's log goes; BUDGET (seconds since the script began, unset: none) skips a
# step whose limit would run past it, so a call ends within its timeout with the steps before complete; SKIP="NAME ..."
# names steps to leave out.
set -u
OUT=${OUT:-/tmp/device-bench}
LOGS=${LOGS:-$OUT}
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
if [ -z "${NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then  # the carried versions replace the image's
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "pip could not install .whl"; exit 2; }
fi

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log to $LOGS/NAME.txt, print its tail
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    echo "== $name skipped (SKIP)"
    return
  fi
  if [ -n "${BUDGET:-}" ] && [ $((SECONDS + limit)) -gt "$BUDGET" ]; then
    echo "== $name skipped: its $limit s would end past the budget ($SECONDS of $BUDGET s gone)"
    return
  fi
  echo "== $name (limit $limit s): $*"
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.txt" 2>&1
  status=$?
  echo "   exit $status after $((SECONDS - start)) s"
  tail -n "${TAIL:-40}" "$LOGS/$name.txt"
}

python3 -c "import omegaconf, gymnasium, crafter, nle, google_crc32c" \
  || { echo "missing packages: run ../shared/gpu/wheels.sh omegaconf google-crc32c here and carry .whl"; exit 2; }
{ nvidia-smi; nproc; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
  > "$LOGS/machine.txt" 2>&1
head -n 20 "$LOGS/machine.txt"
