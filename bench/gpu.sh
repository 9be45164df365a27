#!/usr/bin/env bash
# The one prepared device run (issue 18, ../shared/device/README.md): CUDA tests, the CUDA path end
# to end (bench/gpu_checks.py), the speed benchmarks, then as much of the test suite on CUDA as the
# time left allows. Every result file names the device, the torch version and the command. The run
# keeps to GPU_BUDGET_S seconds (each step has its own limit too), so that a re-run after a fix still
# fits in 15 minutes of device time.
#
#   Here, once:   bash ../shared/device/fetch-wheels.sh          (polars wheels into .whl/)
#   Device:       run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=480)
#   One part:     GPU_STEPS="checks speed_mmoe" bash bench/gpu.sh   (a re-run of what failed; GPU_TESTS and
#                 GPU_SUITE replace the test lists of the steps tests and suite)
#   Dry run:      GPU_DRY=1 OUT=out/gpu-dry bash bench/gpu.sh   (device cpu, tiny sizes; a CI test runs it)
#
# At most 8 files come back from a device run, so there the result files are kept in one folder and
# packed into $OUT/results.tgz after every step (a run cut short still returns what it finished);
# the dry run writes them into $OUT itself.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
BUDGET=${GPU_BUDGET_S:-420}
STEPS=${GPU_STEPS:-"tests checks speed_mmoe speed_balancers speed_metrics speed_arch suite"}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ "${GPU_DRY:-0}" = 1 ]; then
    # the suite runs the metrics tests on CPU already; here only the wiring of every step is checked
    PY=${PYTHON:-python3}; DEV=cpu; RES=$OUT; TESTS=tests/engine/test_cuda.py; SUITE=tests/engine/test_config.py
    ROWS=3000; BIG=4000; METRIC_ROWS=20000; NSTEPS=2; WARMUP=1; BATCH=512; BATCHES=256,512; FIELDS=14
    COMPILE=  # torch.compile on CPU costs ~25 s of CI for nothing the device run does not show
else
    python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 1
    export PYTHONPATH=$PWD/.site:$PWD
    PY=python3; DEV=cuda; RES=$WORK/results; mkdir -p "$RES"
    TESTS=${GPU_TESTS:-"tests/engine/test_cuda.py tests/metrics/test_metrics.py"}
    # every test that takes a device (the default --device auto is CUDA there); the fuzzer needs
    # hypothesis and torchrun's tests two processes on one GPU, so both stay on CPU in CI
    SUITE=${GPU_SUITE:-"tests/engine tests/balancers tests/serving tests/models tests/research tests/metrics tests/data
           --ignore=tests/engine/test_distributed.py"}
    ROWS=50000; BIG=10000000; METRIC_ROWS=10000000; NSTEPS=50; WARMUP=10; BATCH=16384; BATCHES=4096,16384; FIELDS=26; COMPILE=--compile
fi
status=0
pack() { [ "$RES" = "$OUT" ] || tar czf "$OUT/results.tgz" -C "$RES" .; }
stamp() {  # the header every result file starts with
    $PY -c "import sys, torch; d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; \
print(f'# device: {d}; torch {torch.__version__}; command: {\" \".join(sys.argv[1:])}')" "$@"
}
step() {  # step NAME LIMIT_S CMD...: run (SIGINT at the limit: pytest still reports), keep the output
    local name=$1 limit=$2; shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    local left=$((BUDGET - SECONDS))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then echo "NOT RUN: $name (the budget of $BUDGET s is spent)" | tee "$RES/$name.txt"; status=1; return; fi
    echo "== $name (limit $limit s, $SECONDS s in)"
    { stamp "$@"; timeout -s INT -k 15 "$limit" "$@"; } > "$RES/$name.txt" 2>&1 || { echo "FAILED: $name (rc $?)"; status=1; }
    tail -n 6 "$RES/$name.txt"
    pack
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } > "$RES/device.txt"
step tests 120 $PY -m pytest -q -p no:cacheprovider $TESTS
step checks 150 $PY bench/gpu_checks.py all --device $DEV --rows $ROWS --out "$RES"
# the issue's network: MMoE, 26 fields, 4 experts 256-128, 3 towers, on a 10M-row log on the device
step speed_mmoe 150 $PY bench/bench_train.py --device $DEV --rows $BIG --fields $FIELDS --data "$WORK/big/data" \
    --models mmoe --batch-sizes $BATCH --steps $NSTEPS --warmup $WARMUP $COMPILE --placements device,host,stream \
    --json "$RES/speed_mmoe.json"
step speed_balancers 90 $PY bench/bench_train.py --device $DEV --rows $BIG --fields $FIELDS --data "$WORK/big/data" \
    --models mmoe --batch-sizes $BATCH --balancers ew,metabalance,gradcraft,pcgrad --scopes shared,all,representation \
    --profile --steps $NSTEPS --warmup $WARMUP --json "$RES/speed_balancers.json"
step speed_metrics 60 $PY bench/bench_metrics.py --device $DEV --rows $METRIC_ROWS --users $((METRIC_ROWS / 100)) \
    --sklearn-users 200 --repeats 2 --ndcg
step speed_arch 60 $PY bench/bench_train.py --device $DEV --rows $BIG --fields $FIELDS --data "$WORK/big/data" \
    --models single,shared-bottom,mmoe,ple --batch-sizes $BATCHES --steps $NSTEPS --warmup $WARMUP \
    --json "$RES/speed_arch.json"
step suite 600 $PY -m pytest -q -p no:cacheprovider -rfE --tb=short --durations=10 $SUITE
pack
echo "results in $RES: $(ls "$RES" | tr '\n' ' ')"
exit $status
