#!/usr/bin/env bash
# The one-GPU figures of docs/performance.md ("On one GPU"), on a machine with a CUDA GPU
# and the project installed (or its dependencies on PYTHONPATH):
#
#   bash benchmarks/gpu_check.sh run   OUT   # the embedded default on clusters/presets/embedded-1gpu.yaml
#   bash benchmarks/gpu_check.sh bench OUT   # bench_train_step and bench_judge with --device cuda
#   bash benchmarks/gpu_check.sh zero3 OUT   # 1 iteration in bfloat16 with ZeRO-3, the driver killed
#                                            # (whole process group, -9) after iteration 1's first step
#                                            # checkpoint, then the same command again: it must resume
#   bash benchmarks/gpu_check.sh vllm  OUT   # vLLM on CUDA: bench_vllm (vs transformers, start-up, weight
#                                            # updates), the vLLM tests, and the embedded default with
#                                            # generation.backend=vllm sharing the GPU (0.25 of it, 20% memory).
#                                            # Needs vLLM installed ('.[gpu]'); a machine without network that
#                                            # lacks it says so and exits 3.
#
# Each writes its logs, CSVs and the run's results.md/stages.json into OUT (flat).
set -uo pipefail
what=${1:?run, bench, zero3 or vllm}
out=${2:?output folder}
mkdir -p "$out"
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import torch, ray, deepspeed, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "| ray", ray.__version__,
      "| deepspeed", deepspeed.__version__, "| transformers", transformers.__version__)'
  nproc
} 2>&1 | tee "$out/versions_$what.txt"

case "$what" in
  run)
    root=$(mktemp -d)
    start=$(date +%s)
    "$py" jobs/spa_run.py --config clusters/presets/embedded-1gpu.yaml run.root="$root" 2>&1 | tee "$out/run.log"
    rc=${PIPESTATUS[0]}
    echo "exit $rc, wall $(( $(date +%s) - start )) s" | tee "$out/run_wall.txt"
    for f in results.md stages.json metrics.jsonl; do cp "$root/embedded-1gpu/$f" "$out/" 2>/dev/null; done
    exit "$rc"
    ;;
  bench)
    "$py" benchmarks/bench_train_step.py --device cuda --reps 9 --out "$out/train_step.csv" 2>&1 | tee "$out/train_step.log"
    "$py" benchmarks/bench_judge.py --device cuda --reps 5 --out "$out/judge.csv" 2>&1 | tee "$out/judge.log"
    ;;
  zero3)
    root=$(mktemp -d)
    args=(--config clusters/presets/embedded-1gpu.yaml run.root="$root" run.name=zero3-bf16 run.iterations=1
          training.zero_stage=3 model.dtype=bfloat16 training.checkpoint_every=10)
    start=$(date +%s)
    setsid "$py" jobs/spa_run.py "${args[@]}" > "$out/zero3_killed.log" 2>&1 &
    pid=$!
    until [ -n "$(find "$root" -path '*train_1*' -name 'checkpoint_*' 2>/dev/null | head -1)" ] || ! kill -0 "$pid" 2>/dev/null; do
      sleep 1
    done
    sleep 3  # a few steps past the checkpoint, so the resume must redo them
    if kill -0 "$pid" 2>/dev/null; then
      kill -9 -- "-$pid"; echo "killed the driver's process group at $(( $(date +%s) - start )) s:" \
        "$(find "$root" -path '*train_1*' -name 'checkpoint_*' | head -3)" | tee "$out/zero3_wall.txt"
    else
      echo "the first run ended before a step checkpoint of train_1 appeared" | tee "$out/zero3_wall.txt"
    fi
    sleep 5
    "$py" jobs/spa_run.py "${args[@]}" 2>&1 | tee "$out/zero3_resumed.log"
    rc=${PIPESTATUS[0]}
    echo "resumed run: exit $rc, wall $(( $(date +%s) - start )) s in all" | tee -a "$out/zero3_wall.txt"
    for f in results.md stages.json; do cp "$root/zero3-bf16/$f" "$out/zero3_$f" 2>/dev/null; done
    exit "$rc"
    ;;
  vllm)
    if ! "$py" -c 'import vllm; print("vllm", vllm.__version__)' > "$out/vllm_import.txt" 2>&1; then
      echo "vLLM is not importable here and this machine has no network to install it (pip install '.[gpu]'" \
           "needs a registry): nothing of the vLLM GPU path was run. Import error: $(tail -1 "$out/vllm_import.txt")" \
        | tee "$out/vllm_unavailable.txt"
      exit 3
    fi
    cat "$out/vllm_import.txt"
    "$py" benchmarks/bench_vllm.py --device cuda --reps 5 --out "$out/vllm.csv" 2>&1 | tee "$out/vllm_bench.log"
    SPA_RAY_VLLM_DEVICE=cuda SPA_RAY_REQUIRE_VLLM=1 "$py" -m pytest -m vllm -q -x tests/test_vllm_engine.py 2>&1 | tee "$out/vllm_tests.log"
    root=$(mktemp -d)
    start=$(date +%s)
    "$py" jobs/spa_run.py --config clusters/presets/embedded-1gpu.yaml run.root="$root" run.name=embedded-1gpu-vllm \
      generation.backend=vllm generation.gpu_memory_utilization=0.2 2>&1 | tee "$out/vllm_run.log"
    rc=${PIPESTATUS[0]}
    echo "exit $rc, wall $(( $(date +%s) - start )) s" | tee "$out/vllm_run_wall.txt"
    for f in results.md stages.json; do cp "$root/embedded-1gpu-vllm/$f" "$out/vllm_$f" 2>/dev/null; done
    exit "$rc"
    ;;
  *) echo "unknown: $what (run, bench, zero3 or vllm)"; exit 2 ;;
esac
