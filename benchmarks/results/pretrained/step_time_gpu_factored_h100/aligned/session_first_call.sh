# session 23 GPU call: tests, tiled-pass sweep, speed suite new vs old (cb5a7c4) in one run
set -x
nvidia-smi --query-gpu=name --format=csv
python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"
(python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_gpu.py -k "factored or deep or unnormalized" 2>&1 | tail -5) > $OUT/gpu_tests.txt; cat $OUT/gpu_tests.txt
python3 -m benchmarks.optimizer_kernels --repeats 3 --factored-tiles --optimizers "AdamW(fused)" DeepMomentum "DeepMomentum.pretrained(factored)" > $OUT/kernels.md 2>&1; cat $OUT/kernels.md
python3 -m benchmarks run --suite speed --device cuda --optimizers "AdamW(fused)" DeepMomentum "DeepMomentum.pretrained(factored)" --out $OUT/speed --no-plots > $OUT/speed.log 2>&1; tail -25 $OUT/speed.log
(cd runs/old && python3 -c "import deepopt;print(deepopt.__file__)" && PYTHONPATH=$PWD python3 -m benchmarks run --suite speed --device cuda --optimizers "AdamW(fused)" "DeepMomentum.pretrained(factored)" --out $OUT/speed_old --no-plots > $OUT/speed_old.log 2>&1; tail -12 $OUT/speed_old.log)
