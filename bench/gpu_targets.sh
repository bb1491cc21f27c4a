#!/usr/bin/env bash
# The fast-weights engine's GPU targets in one run (one H100, or an H200: the same dense bf16
# peak, more memory bandwidth; Llama-3.2-1B shape with random weights, bf16, context 192,
# query 32):
#   1. reference vs fastweights at meta-batch 16 (target: fastweights >= 30x the reference's
#      tasks/s, and >= 40% of bf16 peak),
#   2. fastweights at meta-batch 64 in one pass with the inner backward checkpointed per
#      block (target: fits in 80 GB), and at 16 / 32 / 64 without checkpointing for comparison.
# Needs only torch and transformers (runs on a bare GPU machine from a checkout):
#   bash bench/gpu_targets.sh [OUT_DIR]      (default bench/gpu; PYTHON=python3)
#   bash bench/gpu_targets.sh OUT_DIR compile
#       instead: fastweights with and without --compile-ops (meta.compile_ops) side by side,
#       at meta-batch 16 and 32, and 64 with --checkpoint-inner (~6 minutes, compiling included)
#   bash bench/gpu_targets.sh OUT_DIR graph
#       (every target's row and the levers in one call: run this first when GPU time is short)
#       instead, three runs, the likeliest to meet the targets first (so a call stopped at its
#       time limit keeps it): the reference and fastweights with --compile-ops, eager and
#       captured as one CUDA graph (--cuda-graph also, bench/graph_step.py), at meta-batch 16,
#       side by side in one run; then the same without --compile-ops at 16 and 32; last,
#       fastweights at 64 with --checkpoint-inner, eager and graphed (~6 minutes). Each graphed
#       row has graph_vs_eager (a replay against an eager step from the same state) and its
#       control eager_vs_eager in the JSON.
# Writes OUT_DIR/b16.json, b64.json and census.json (compile: b16[-compiled].json,
# b64[-compiled].json; graph: b16-graph-compiled.json, b16-graph.json, b64-graph.json) and
# prints the tables; ~6 minutes on an H100. PYTHON must have torch (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/gpu}
py=${PYTHON:-python3}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
common=(--device cuda --shape llama-1b --dtype bfloat16 --ctx 192 --query 32)
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$py" -c "import torch" 2>/dev/null || {
    echo "gpu_targets: $py has no torch (PYTHON=... picks another, e.g. PYTHON=.venv/bin/python)" >&2
    exit 2
}
"$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || {
    echo "gpu_targets: $py sees no CUDA device (these runs need one; PYTHON=... picks another)" >&2
    exit 2
}
mkdir -p "$out"
if [[ "${2:-}" == compile ]]; then
    for flag in "" --compile-ops; do
        "$py" bench/meta_step.py "${common[@]}" --meta-batch 16,32 --engines fastweights \
            --reps 3 $flag --json "$out/b16${flag:+-compiled}.json"
        "$py" bench/meta_step.py "${common[@]}" --meta-batch 64 --engines fastweights \
            --checkpoint-inner --reps 2 $flag --json "$out/b64${flag:+-compiled}.json"
    done
    exit 0
fi
if [[ "${2:-}" == graph ]]; then  # each run goes on if an earlier one failed
    "$py" bench/meta_step.py "${common[@]}" --meta-batch 16 --engines reference,fastweights \
        --ref-max-batch 16 --reps 3 --compile-ops --cuda-graph also \
        --json "$out/b16-graph-compiled.json" ||
        echo "gpu_targets: the compiled run failed" >&2
    "$py" bench/meta_step.py "${common[@]}" --meta-batch 16,32 --engines reference,fastweights \
        --ref-max-batch 16 --reps 3 --cuda-graph also --json "$out/b16-graph.json" ||
        echo "gpu_targets: the meta-batch 16/32 run failed" >&2
    "$py" bench/meta_step.py "${common[@]}" --meta-batch 64 --engines fastweights \
        --checkpoint-inner --reps 2 --cuda-graph also --json "$out/b64-graph.json" ||
        echo "gpu_targets: the meta-batch 64 run failed" >&2
    exit 0
fi
"$py" bench/meta_step.py "${common[@]}" --meta-batch 16,32 --engines reference,fastweights \
    --ref-max-batch 16 --reps 3 --json "$out/b16.json"
"$py" bench/meta_step.py "${common[@]}" --meta-batch 64 --engines fastweights \
    --checkpoint-inner --reps 2 --json "$out/b64.json"
# the same steps counted (calls, FLOPs, traffic; see bench/RESULTS.md for the time model)
"$py" bench/op_census.py --shape llama-1b --ctx 192 --query 32 --meta-batch 16 \
    --variants reference,fused,vjp --json "$out/census.json"
