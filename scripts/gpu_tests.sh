#!/usr/bin/env bash
# Run the GPU test suite on a CUDA machine (Hopper for the fbgemm kernels).
# If .device/whl/ holds wheels (see CONTRIBUTING.md), they are installed into /tmp/site first.
# Usage: scripts/gpu_tests.sh [extra pytest args]; logs go to ${OUT:-.}/gpu_tests.log
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".device/whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .device/whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
python3 -m pytest -m gpu -v -p no:cacheprovider "$@" test 2>&1 | tee "${OUT:-.}/gpu_tests.log"
exit "${PIPESTATUS[0]}"
