#!/usr/bin/env bash
# Short GPU calibration of the pool suites (about 2 minutes on 4 GPUs): the lm models' step
# times on cuda:0 (lm.prepare), and short runs of every recall / continual configuration on the
# other GPUs; their records give seconds per step, from which the full runs' sizes are chosen.
#
#   bash benchmarks/experiments/calibrate.sh          # writes $OUT/calibration_lm.json, $OUT/records.jsonl
set -uo pipefail
OUT=${OUT:-/tmp/evidence_calibration}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi -L | tee "$OUT/gpus.txt"
N=$(nvidia-smi -L | wc -l)
OTHERS=$(seq -s, -f 'cuda:%g' 1 $((N - 1)))
python3 - "$OUT" <<'PY' > "$OUT/lm_calibration.txt" 2>&1 &
import json, sys, torch
from benchmarks.experiments import lm
out = lm.prepare("gpu", "cuda:0")
out["gpu"] = torch.cuda.get_device_name(0)
json.dump(out, open(sys.argv[1] + "/calibration_lm.json", "w"), indent=1)
print(out)
PY
python3 -m benchmarks run --suite recall continual_levels --preset gpu --seeds 1 --devices "$OTHERS" \
  --set recall.steps=20 --set recall.evals=1 --set 'recall.long={"settings": [[1024, 128]], "mixers": ["attention", "delta", "titans"], "widths": [128], "steps": 20}' \
  --set continual.steps_per_task=20 --threads 4 --deadline 200 --out "$OUT" 2>&1 | tee "$OUT/log.txt"
wait
cat "$OUT/lm_calibration.txt"
