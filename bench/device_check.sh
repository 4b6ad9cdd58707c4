#!/usr/bin/env bash
# The GPU check of populations (issue #11), prepared for a session lent a
# device machine (the device tool; 15 minutes of device time in all).
#
# Here, once (the data does not travel by itself; ../shared stays behind):
#   mkdir -p .device_data/uci && cp -r ../shared/data/uci/energy .device_data/uci/
#   mkdir -p .git/info; grep -qsx '/.device_data/' .git/info/exclude || echo /.device_data/ >> .git/info/exclude
# On the device (run: carry [".device_data"], timeout_s 580):
#   bash bench/device_check.sh
# Extra arguments go to bench/device_population.py (e.g. --modes eager).
# Everything lands in $OUT: gpu.txt, log.txt, device_population.json.
set -o pipefail
export HYPERGRAD_DATA=${HYPERGRAD_DATA:-$PWD/.device_data} PYTHONUNBUFFERED=1
out=${OUT:-/tmp/device_check}
mkdir -p "$out"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
"${PYTHON:-python3}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$out/gpu.txt"
"${PYTHON:-python3}" bench/device_population.py --deadline-s "${DEADLINE:-480}" \
    --json "$out/device_population.json" "$@" 2>&1 | tee "$out/log.txt"
