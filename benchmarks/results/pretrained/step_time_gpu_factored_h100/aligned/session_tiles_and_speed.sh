# session 23, second call: the tiled pass's tiles (aligned rows), then the speed suite twice at the best tile
set -x
nvidia-smi --query-gpu=name --format=csv
python3 -m benchmarks.optimizer_kernels --repeats 3 --factored-tiles --optimizers "AdamW(fused)" > $OUT/sweep.md 2>&1
grep "^| (" $OUT/sweep.md
TILE=$(python3 - <<'PY'
import re, collections
t = collections.defaultdict(float)
for line in open(__import__("os").environ["OUT"] + "/sweep.md"):
    m = re.match(r"\| (\(.*\)) \| (\w+) \| ([\d.]+) \|", line)
    if m:
        t[m.group(1)] += float(m.group(3))
print(min(t, key=t.get))
PY
)
echo "best tile: $TILE"
for i in 1 2; do
python3 - "$TILE" "$i" <<'PY'
import os, sys
from deepopt.levels.deep import fused
fused.FACTORED_TILE = eval(sys.argv[1])
from benchmarks.cli import main
main(["run", "--suite", "speed", "--device", "cuda", "--optimizers", "AdamW(fused)", "DeepMomentum",
            "DeepMomentum.pretrained(factored)", "--out", os.environ["OUT"] + f"/speed{sys.argv[2]}", "--no-plots"])
PY
done > $OUT/speed.log 2>&1
grep -E "^│ (AdamW|DeepMomentum)" $OUT/speed.log
