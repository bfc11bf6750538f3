#!/usr/bin/env bash
# The `speed` suite on one GPU (DEVICE, default cuda) for several trees in one call: before/after pairs on one machine.
#
#   TREES="runs/before ." OPTIMIZERS="'AdamW(fused)' 'SGD(fused)' AdamMemory" bash benchmarks/speed_trees.sh
#
# Each tree in $TREES (folders, e.g. an earlier commit unpacked by `git archive`; "." is this one)
# runs `python -m benchmarks run --suite speed --device "${DEVICE:-cuda}" --optimizers $OPTIMIZERS` with its own
# code, in the order of $TREES, $ROUNDS times (default 2: the order alternates between rounds, so a
# drift of the card's clocks hits every tree alike). Each run writes $OUT/<tree>_<round>/; the last
# lines print every row's ratio to torch (one step / back to back) per tree and round.
set -u
OUT=${OUT:-./runs/speed_trees}
ROUNDS=${ROUNDS:-2}
OPTIMIZERS=${OPTIMIZERS:-"'AdamW(fused)' 'SGD(fused)' AdamMemory MomentumMemory PreconditionedMomentum"}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$OUT/session.log"
order=(${TREES:-.})
for r in $(seq 1 "$ROUNDS"); do
  for tree in "${order[@]}"; do
    name=$(basename "$(cd "$tree" && pwd)")_$r
    echo "[$(date +%T)] $tree round $r" | tee -a "$OUT/session.log"
    (cd "$tree" && eval python3 -m benchmarks run --suite speed --device "${DEVICE:-cuda}" --optimizers $OPTIMIZERS \
       --out "$OUT/$name") > "$OUT/$name.log" 2>&1 || echo "  failed: see $OUT/$name.log" | tee -a "$OUT/session.log"
  done
  order=($(printf '%s\n' "${order[@]}" | tac))  # the other order next round
done
python3 - "$OUT" <<'PY' | tee -a "$OUT/session.log"
import json, sys
from pathlib import Path
runs = sorted(p for p in Path(sys.argv[1]).glob("*/results.json"))
rows = {}
for p in runs:
    for r in json.loads(p.read_text())["rows"]:
        rows.setdefault((r["optimizer"], r["dtype"]), {})[p.parent.name] = r
names = [p.parent.name for p in runs]
print("| optimizer | dtype | " + " | ".join(names) + " |")
print("|---|---|" + "---|" * len(names))
for (opt, dt), by in rows.items():
    cells = [f"{by[n]['ratio_to_torch']:.2f} / {by[n].get('ratio_to_torch_chain', float('nan')):.2f}" if n in by else "-"
             for n in names]
    print(f"| {opt} | {dt} | " + " | ".join(cells) + " |")
PY
