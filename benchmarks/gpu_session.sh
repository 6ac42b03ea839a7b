#!/usr/bin/env bash
# Everything this project checks and measures on a GPU, in one prepared run.
#
#   bash benchmarks/gpu_session.sh                        # tests loss speed (about 3 minutes on an H100)
#   bash benchmarks/gpu_session.sh levers                 # all lever variants, one process each (30-55 s each)
#   bash benchmarks/gpu_session.sh lowlabel               # the full low-label protocol (long: a call of its own)
#   bash benchmarks/gpu_session.sh speed:120 tests:90      # STAGE:SECONDS sets a stage's time limit
#   LEVERS="none;channels_last" bash benchmarks/gpu_session.sh levers:60   # some lever variants, 60 s each
#   TESTS_K="not levers" bash benchmarks/gpu_session.sh tests               # a subset of the CUDA tests
#   PROFILES="defaults + prefetch;none,segment" bash benchmarks/gpu_session.sh profile   # LEVERS[,TASK] each
#
# Stages:
#   ceilings  benchmarks/gpu_ceilings.py: the card's bf16 matrix-product rate and copy bandwidth, measured
#   tests     tests/test_cuda.py: losses, inference, training and speed levers on CUDA against the CPU
#   loss      benchmarks/loss_bench.py on the GPU: direct O(N^3) form vs ours, N = 64 .. 16384, D = 512
#   speed     coral bench speed: the issue-6 protocol, ours next to the published-code-like baseline, MFU
#   levers    coral bench speed --levers: each speed lever against none, one process per lever
#   profile   benchmarks/profile_step.py: the operators that take a pretraining step's and a volume's device time
#   scaling   benchmarks/speed_bench.py --scaling: cost against image size and batch size
#   lowlabel  coral bench lowlabel (the full protocol, or LOWLABEL_ARGS's part) on 100 phantom subjects
#
# On the device tool (no network, no nibabel: the CUDA CLI test skips itself), from the repository
# root. Seen on an H100 (docs/performance.md, benchmarks/results/h100-*): ceilings 5-7 s, speed 90 s,
# loss 70 s, tests 70 s (all of tests/test_cuda.py), a lever variant 24-45 s, a profile about 25 s,
# scaling (4 sizes x 3 batches) 142 s; lowlabel at full size: 24 s to pretrain CORAL, 16-19 s per
# fine-tuning and scoring. The lent time was 15 minutes in all, about 35 s of it to start a machine, and
# the machine goes back 30 s after a call: prepare the calls, send the second as soon as the first returns.
# The next session's calls, about 590 + 260 s (the full low-label protocol needs about 1.6 hours of an
# H100, so it runs in parts that continue one table; first every method at M = 1, seed 0):
#   LEVERS="defaults;defaults + defer_metrics;defaults + prefetch;defaults + prefetch + defer_metrics;defaults + fuse_batchnorm;defaults + pad_channels" \
#   PROFILES="defaults + defer_metrics;defaults + fuse_batchnorm,segment" \
#     bash benchmarks/gpu_session.sh tests:100 levers:65 profile:40   # at most 570 s, about 420 s expected
#   (all CUDA tests: since the last GPU session pretraining slices its indices on the device, segmentation keeps
#   its labels there until the last batch, defer_metrics is new, and so are models with a pixel spacing, which
#   segment a wider slice in overlapping squares)
#   then at once (the machine goes back 30 s after a call), with the time left:
#   LOWLABEL_TABLE=benchmarks/results/lowlabel-gpu-table.json LOWLABEL_ARGS="--labeled 1 --seeds 1 --workers 4 --score-every 100" \
#     bash benchmarks/gpu_session.sh lowlabel:230
#   and copy the returned lowlabel_table.json to benchmarks/results/lowlabel-gpu-table.json. (--score-every 100:
#   each fine-tuning also scored every 100 of its 1000 steps, for the published code's best-epoch choice; on the
#   quick setting that choice raised both inits by 0.021 and left CORAL's lead as it was, docs/results.md.)
# Later sessions continue that table with "--labeled 1,2,6 --seeds 3", and may run the frozen-encoder
# check at full size into a table of its own (on the CPU's quick setting, frozen CORAL and PCL encoders beat a
# random one in 15 of 20 runs while fully fine-tuned ones tied it; docs/results.md):
#   LOWLABEL_TABLE=benchmarks/results/lowlabel-gpu-frozen.json \
#   LOWLABEL_ARGS="--labeled 1 --seeds 1 --methods random,coral,simclr --freeze-encoder --workers 4" ...
# and the recipe that ranks the methods as the paper does on the quick setting (LP-FT with a slow encoder: CORAL
# +0.016 over random init in 58 of 80 runs there, but only by costing random init 0.011; docs/results.md, "Keeping
# the pretrained encoder"), every method in a table of its own, with the plain table beside it:
#   LOWLABEL_TABLE=benchmarks/results/lowlabel-gpu-lpft.json LOWLABEL_ARGS="--labeled 1 --seeds 1 --workers 4
#   --methods random,simclr,gcl,pcl,coral --freeze-encoder-steps 333 --encoder-lr-scale 0.1 --score-every 100" ...
# What the first call measures:
# defer_metrics (new: each step's loss read back after the next step is queued; the GPU idled 16-19 ms of
# each 92-96 ms step with the defaults), prefetch's step spread alone and with it (its two measurements
# disagreed: 0.53x and 1.13x), BatchNorm folding on a GPU (22.9 ms of a 156 ms volume's inference was
# BatchNorm; the 512 x 512 volume took 0.338 s against the 0.3 s target), and the pad_channels lever (never
# run on a GPU; its CUDA test lines too). Since 2026-11-28 no pretraining step copies its indices to the GPU
# (one copy an epoch), which the "defaults" row measures against the earlier 675.4 slices/s. The lowlabel
# call: whether 4 workers sharing the GPU finish more runs per minute than one process did on 2026-11-27
# (a fine-tuning and scoring every 16-19 s; CORAL's pretraining 24 s).
# Each stage has its own time limit, so a slow one cannot starve the rest, and writes as it goes:
# $OUT/gpu_session.log (every table and the test summary) and one JSON file per benchmark
# (speed.json, levers.jsonl, lowlabel_table.json): the tool brings back at most 8 files.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}  # DEVICE=cpu PYTHON=.venv/bin/python: a dry run of the script's plumbing on a CPU
LOG="$OUT/gpu_session.log"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests loss speed)

say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
run_stage() {  # run_stage SECONDS FILE CMD...: stdout appended to FILE, stderr to the log; a timeout is reported, not fatal
  local limit=$1 file=$2; shift 2
  timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$file" 2>>"$LOG"
  local rc=$?
  [ $rc -ne 0 ] && say "exit status $rc (124: stopped at its ${limit} s limit)"
  return 0
}

say "start: stages ${stages[*]}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'python', platform.python_version(), 'cpus', __import__('os').cpu_count())"; } >>"$LOG" 2>&1

for spec in "${stages[@]}"; do
  stage=${spec%%:*}
  limit=""; [ "$spec" != "$stage" ] && limit=${spec#*:}  # STAGE:SECONDS overrides the stage's limit
  say "stage $stage${limit:+ (limit $limit s)}"
  case $stage in
    ceilings)
      run_stage "${limit:-60}" "$LOG" $PY benchmarks/gpu_ceilings.py ;;
    tests)  # -v: each result is logged as it comes, so a stage stopped at its limit still reports
      run_stage "${limit:-200}" "$LOG" $PY -m pytest -v -p no:cacheprovider -p no:warnings -o addopts="" \
        ${TESTS_K:+-k "$TESTS_K"} tests/test_cuda.py ;;
    loss)
      run_stage "${limit:-150}" "$LOG" $PY benchmarks/loss_bench.py --device "$DEV" --sizes 64 256 1024 4096 16384 --extra 8192x256 \
        --repeats 20 --timeout 60 ;;
    speed)
      : >"$OUT/speed.json"
      run_stage "${limit:-150}" "$OUT/speed.json" $PY -m coral_core.cli bench speed --device "$DEV" --json
      $PY - "$OUT/speed.json" >>"$LOG" 2>&1 <<'EOF'
import json, sys
from coral_core.speedbench import format_speed_table
try:
    print(format_speed_table(json.load(open(sys.argv[1]))))
except Exception as exc:  # the stage stopped before writing
    print("no speed table:", exc)
EOF
      ;;
    levers)
      touch "$OUT/levers.jsonl"  # appended to: a second levers stage in one call adds its rows
      IFS=';' read -ra variants <<<"${LEVERS:-none;channels_last;data_on_device;compile;compile reduce-overhead;all (compile default);cudnn_benchmark;fuse_batchnorm;prefetch;defaults;defaults + prefetch}"
      for variant in "${variants[@]}"; do  # LEVERS="a;b": some variants only; the limit is per variant
        run_stage "${limit:-85}" "$OUT/levers.jsonl" $PY -m coral_core.cli bench speed --device "$DEV" --levers "$variant" --json
      done
      $PY - "$OUT/levers.jsonl" >>"$LOG" 2>&1 <<'EOF'
import json, sys
from coral_core.speedbench import format_levers_table
results = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
if results:
    merged = dict(results[0], rows=[r for res in results for r in res["rows"]])
    print(format_levers_table(merged))
EOF
      ;;
    profile)  # PROFILES="LEVERS[,TASK];...": by default a pretraining step with the defaults, then eager
      # without levers, then a volume's inference with the defaults; the limit is per profile
      IFS=';' read -ra profiles <<<"${PROFILES:-defaults;none;defaults,segment}"
      for entry in "${profiles[@]}"; do
        run_stage "${limit:-120}" "$LOG" $PY benchmarks/profile_step.py --device "$DEV" --levers "${entry%%,*}" \
          --task "$([ "$entry" != "${entry#*,}" ] && echo "${entry#*,}" || echo pretrain)" --rows 15
      done ;;
    scaling)
      run_stage "${limit:-300}" "$LOG" $PY benchmarks/speed_bench.py --device "$DEV" --no-table --scaling --sizes 128 256 352 512 \
        --batches 16 32 64 ;;
    lowlabel)
      # The protocol's runs go to $OUT/lowlabel_table.json as each finishes, so a stage stopped at its
      # limit keeps them. LOWLABEL_TABLE=FILE.json (committed after an earlier session) is continued: its
      # runs are not run again. LOWLABEL_ARGS="--labeled 1 --seeds 1" or "--methods random,coral" chooses a part.
      [ -n "${LOWLABEL_TABLE:-}" ] && [ -f "$LOWLABEL_TABLE" ] && cp "$LOWLABEL_TABLE" "$OUT/lowlabel_table.json"
      run_stage "${limit:-580}" "$LOG" $PY -m coral_core.cli bench lowlabel --device "$DEV" \
        --table "$OUT/lowlabel_table.json" ${LOWLABEL_ARGS:-} ;;
    *)
      say "unknown stage $stage (ceilings tests loss speed levers profile scaling lowlabel)" ;;
  esac
done
say "done"
