#!/usr/bin/env bash
# One device run (../shared/device/README.md): the CUDA tests and the GPU benchmarks, results in $OUT.
# Here, once:  bash ../shared/device/fetch-wheels.sh   (polars wheels into .whl/)
# Then:        run(command="bash bench/gpu.sh", carry=[".whl"])
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:$PWD
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -m pytest -q tests/engine/test_cuda.py tests/metrics/test_metrics.py 2>&1 | tail -20 > "$OUT/tests.txt"
python3 bench/bench_train.py --device cuda --rows 10000000 --batch-sizes 4096,16384 --steps 50 --warmup 10 \
    --json "$OUT/arch.json" > "$OUT/arch.txt" 2>&1
python3 bench/bench_train.py --device cuda --rows 2000000 --models mmoe --batch-sizes 16384 --balancers all \
    --scopes shared,all,representation --steps 30 --warmup 5 --json "$OUT/balancers.json" > "$OUT/balancers.txt" 2>&1
python3 bench/bench_metrics.py --device cuda > "$OUT/metrics.txt" 2>&1
tail -n 12 "$OUT"/tests.txt "$OUT"/arch.txt "$OUT"/balancers.txt
