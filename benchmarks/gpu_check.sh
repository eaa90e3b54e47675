#!/usr/bin/env bash
# The GPU check (issue 12), as one command on a lent GPU machine, from the repository root:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT, else benchmarks/gpu-out
#   DEVICE=cpu BATCHES="1 2" REPEATS=1 CASES=--quick SEGMENT="--images 2 --rounds 1" \
#     bash benchmarks/gpu_check.sh /tmp/check                                                # on the CPU
#   PRECISIONS=fp16 CASES=--quick REPEATS=5 bash benchmarks/gpu_check.sh   # in a 15-minute lease
#
# The device tests come first and compile the Triton kernels for their shapes (a minute or so);
# each step prints as it goes, so a run cut off by its time limit still brings back what it
# measured. The kernels of steps 1-4 have not yet run on a GPU (benchmarks/RESULTS.md): if the
# device tests fail, the first thing to read is tests.log.
#
# 1. the device test subset (tests/test_device.py with RFCLIP_TEST_DEVICE), 2. bench_engine.py on
# the device with fp16 and with bf16 autocast: operator launches, encoder-only crops/s of clip and
# rfclip at each batch, plain and graphed, the share of the dense peak, peak memory, device time per
# RF-CLIP step at the largest batch, autocast against fp32; 3. step 3 alone on CUDA, eager against its
# kernel (bench_solver.py); 4. the segmenter cases at the default precision, plain and graphed
# (CASES=--quick: the first case only); 5. `rfclip segment` over a folder against the engine alone
# (bench_segment.py: what 32 more images cost the command, its start cancelled, against a warm
# engine, and the start itself; SEGMENT="--images 2 --rounds 1" shortens it). Logs and
# JSON go to OUT_DIR; copy the tables into benchmarks/RESULTS.md. PRECISIONS=fp16 leaves bf16 out
# (8 files then, as many as the device tool brings back; the H200 ran steps 1-4 in 400 s with
# REPEATS=10).
#
# The lent machine has Python 3.12, torch and timm but not open_clip: carry its pure-Python wheels
# in .whl (ignored by git; see the device tool's README), made here with e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13   # what the H200 runs used
# (the rest of what open_clip needs, regex, timm, huggingface_hub, safetensors, is on that machine's
# image, as its KINDS.md lists), then `python3 -c "import open_clip"` there. They are installed
# into /tmp/site first when .whl holds any.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-${OUT:-benchmarks/gpu-out}}
DEVICE=${DEVICE:-cuda}
BATCHES=${BATCHES:-1 8 32 128}
REPEATS=${REPEATS:-5}
CASES=${CASES:-}
PRECISIONS=${PRECISIONS:-fp16 bf16}
PYTHON=${PYTHON:-python3}
SEGMENT=${SEGMENT:---images 32 --rounds 2}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

status=0
{
  "$PYTHON" -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
  if [ "$DEVICE" != cpu ]; then nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; fi
} 2>&1 | tee "$OUT_DIR/tests.log"  # the device's facts head the tests' log

echo "== device tests on $DEVICE"
RFCLIP_TEST_DEVICE=$DEVICE "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 \
  | tee -a "$OUT_DIR/tests.log" || status=1

for precision in $PRECISIONS; do
  echo "== bench_engine on $DEVICE, $precision autocast, batches $BATCHES"
  # shellcheck disable=SC2086  # BATCHES is a list of numbers
  "$PYTHON" benchmarks/bench_engine.py --device "$DEVICE" --precision "$precision" --skip-cases \
    --batches $BATCHES --repeats "$REPEATS" --json "$OUT_DIR/bench_engine_${DEVICE}_${precision}.json" 2>&1 \
    | tee "$OUT_DIR/bench_engine_${precision}.log" || status=1
done

if [ "$DEVICE" != cpu ]; then
  echo "== step 3 (the Fiedler vector and the cut) alone on $DEVICE"
  "$PYTHON" benchmarks/bench_solver.py --json "$OUT_DIR/bench_solver.json" 2>&1 | tee "$OUT_DIR/bench_solver.log" \
    || status=1
fi

echo "== the segmenter cases on $DEVICE"
# shellcheck disable=SC2086  # CASES is empty or --quick
"$PYTHON" benchmarks/bench_engine.py --device "$DEVICE" --repeats "$REPEATS" $CASES \
  --json "$OUT_DIR/bench_engine_${DEVICE}_cases.json" 2>&1 | tee "$OUT_DIR/bench_engine_cases.log" || status=1

echo "== rfclip segment over a folder on $DEVICE, against the engine alone"
# no log file of its own (8 files come back): its table ends the output
# shellcheck disable=SC2086  # SEGMENT is a list of options
"$PYTHON" benchmarks/bench_segment.py --device "$DEVICE" $SEGMENT --json "$OUT_DIR/bench_segment_${DEVICE}.json" \
  2>&1 | grep -v "^WARNING" || status=1
exit $status
