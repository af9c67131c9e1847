#!/usr/bin/env bash
# Training speed on one GPU (issue 18): benchmarks/train_throughput.py on GPT-2 124M (micro batch 8 and 16) and the
# 1.3B preset (micro batch 16, global batch 32 and 64), the GPU training tests, and a profile of the 1.3B step. The
# steps' limits add up to more than one device call's 10 minutes: split them over two calls with ONLY.
# Every row is appended to $OUT/train_throughput.jsonl as soon as it is measured, each step's output goes to
# $OUT/<step>.log, and a summary table is printed at the end. Each step runs under `timeout`, so a hang or a slow
# step costs only its own rows.
#
#   OUT=/some/dir bash benchmarks/gpu_training_run.sh        (from the repository root, package installed)
#   ONLY="mbs8 1_3b" OUT=... bash benchmarks/gpu_training_run.sh    (only the steps named)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
RESULTS="$OUT/train_throughput.jsonl"
export PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
START=$SECONDS

run_step() {  # name, seconds, command...
    local name=$1 limit=$2 began=$SECONDS rc
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    echo "=== $name (at most ${limit} s): $*"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - began)) s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')" \
        | tee -a "$OUT/summary.txt"
    grep -E "overhead|tokens/s|PASSED|FAILED|ERROR|passed|failed|Error" "$OUT/$name.log" \
        | grep -v "^{" | tail -n 20
}

{
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    python -c "import torch, lightning, transformers, megatron.core as m; print('torch', torch.__version__, \
'| lightning', lightning.__version__, '| transformers', transformers.__version__, '| megatron-core', m.__version__)"
} 2>&1 | tee "$OUT/versions.txt"

BENCH="python benchmarks/train_throughput.py --out $RESULTS --steps 12 --warmup 4"
# The comparison the targets are about first: overhead (median of 3 alternating rounds), transformers eager and
# compiled, all fusions, the fused weight-gradient accumulation and Adam against their unfused forms, CUDA graphs
# with the fusions (last in its process: megatron's graphs are process-wide).
run_step cross_entropy 60 python benchmarks/cross_entropy.py --out "$OUT/cross_entropy.jsonl"
run_step qkv_bias 60 python benchmarks/qkv_bias.py --out "$OUT/qkv_bias.jsonl"
run_step layer_norm 60 python benchmarks/layer_norm.py --out "$OUT/layer_norm.jsonl"
run_step mbs8 240 $BENCH --cases overhead hf fusions_all wgrad fused_adam cuda_graphs --global-batch 16 --micro-batch 8
# The 1.3B preset's MFU, default and with every fusion, at global batch 32 and 64 (the optimizer step amortised).
run_step 1_3b 100 $BENCH --model gpt2_1_3b --cases fusions_all --global-batch 32 --micro-batch 16 --steps 10 --warmup 3
run_step 1_3b_gb64 100 $BENCH --model gpt2_1_3b --cases fusions_all --global-batch 64 --micro-batch 16 --steps 8 --warmup 2
# What each fusion adds on top of the others on the 1.3B step (each switched off in turn, in one process).
run_step 1_3b_each_off 200 $BENCH --model gpt2_1_3b --cases fusions_each_off --global-batch 32 --micro-batch 16 --steps 6 --warmup 2
run_step gpu_tests 90 python -m pytest -v -p no:cacheprovider tests/test_training_gpu.py
# Not needed for the figures above: where the 1.3B step's GPU time goes, and micro batch 16 on GPT-2 124M.
run_step profile_1_3b 120 python benchmarks/profile_step.py --preset gpt2_1_3b --fusions --stacks --rows 40 --global-batch 32 --micro-batch 16
run_step mbs16 70 $BENCH --cases hf cuda_graphs --no-hf-compile --global-batch 32 --micro-batch 16

python - "$RESULTS" <<'EOF' | tee "$OUT/summary_table.txt"
import json, os, sys
rows = [json.loads(line) for line in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
print(f"{'case':<12} {'mb':>3} {'name':<62} {'tokens/s':>10} {'MFU':>6}  ratios (tokens/s over the baseline)")
for row in rows:
    if "rounds" in row:
        print(f"{row['case']:<12} {'':>3} {row['name']:<62} median {row['median']:.3f} of {row['rounds']}")
    elif "error" in row:
        print(f"{row['case']:<12} {row.get('micro_batch', ''):>3} {row['name']:<62} ERROR {row['error'][:150]}")
    elif "syncs_per_step" in row:
        print(f"{row['case']:<12} {row['micro_batch']:>3} {row['name']:<62} {row['syncs_per_step']:.1f} per step")
        for site, count in row["sites"][:8]:
            print(f"{'':<17} {count:5.1f}  {site[:150]}")
    else:
        vs = ", ".join(f"{value:.3f} vs {base}" for base, value in row.get("vs", {}).items())
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else ""
        print(f"{row['case']:<12} {row['micro_batch']:>3} {row['name']:<62} {row['tokens_per_s']:>10,.0f} {mfu:>6}  {vs}")
EOF
echo "=== total $((SECONDS - START)) s; rows in $RESULTS, logs in $OUT"
