#!/usr/bin/env bash
# The one prepared device run (issue 18, ../shared/device/README.md): CUDA tests, the CUDA path end
# to end (bench/gpu_checks.py), then the speed benchmarks; every result file under $OUT names the
# device, the torch version and the command. Planned to take under 8 minutes on an H200, so that a
# re-run after a fix still fits in 15 minutes of device time.
#
#   Here, once:   bash ../shared/device/fetch-wheels.sh          (polars wheels into .whl/)
#   Device:       run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
#   Dry run:      GPU_DRY=1 OUT=out/gpu-dry bash bench/gpu.sh   (device cpu, tiny sizes; a CI test runs it)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
if [ "${GPU_DRY:-0}" = 1 ]; then
    # the suite runs the metrics tests on CPU already; here only the wiring of every step is checked
    PY=${PYTHON:-python3}; DEV=cpu; TESTS=tests/engine/test_cuda.py
    ROWS=3000; BIG=5000; METRIC_ROWS=20000; STEPS=2; WARMUP=1; BATCHES=512
else
    python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 1
    export PYTHONPATH=$PWD/.site:$PWD
    PY=python3; DEV=cuda; TESTS="tests/engine/test_cuda.py tests/metrics/test_metrics.py"
    ROWS=50000; BIG=10000000; METRIC_ROWS=10000000; STEPS=50; WARMUP=10; BATCHES=4096,16384
fi
status=0
stamp() {  # the header every result file starts with
    $PY -c "import sys, torch; d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; \
print(f'# device: {d}; torch {torch.__version__}; command: {\" \".join(sys.argv[1:])}')" "$@"
}
step() {  # step NAME CMD...: run, keep stdout+stderr in $OUT/NAME.txt, remember a failure
    local name=$1; shift
    { stamp "$@"; "$@"; } > "$OUT/$name.txt" 2>&1 || { echo "FAILED: $name (rc $?)"; status=1; }
    tail -n 3 "$OUT/$name.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } > "$OUT/device.txt"
# 1. tests that take a device (CUDA-only ones skip on CPU), 2. the CUDA path, 3. speed.
step tests $PY -m pytest -q -p no:cacheprovider $TESTS
step checks $PY bench/gpu_checks.py all --device $DEV --rows $ROWS --out "$OUT"
step speed_arch $PY bench/bench_train.py --device $DEV --rows $BIG --batch-sizes $BATCHES --steps $STEPS \
    --warmup $WARMUP --json "$OUT/speed_arch.json"
step speed_balancers $PY bench/bench_train.py --device $DEV --rows $((BIG / 5)) --models mmoe \
    --batch-sizes ${BATCHES##*,} --balancers ew,metabalance,gradcraft,pcgrad --scopes shared,all,representation \
    --steps $STEPS --warmup $WARMUP --json "$OUT/speed_balancers.json"
step speed_metrics $PY bench/bench_metrics.py --device $DEV --rows $METRIC_ROWS --users $((METRIC_ROWS / 100)) \
    --sklearn-users 200 --repeats 2
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
