#!/usr/bin/env bash
# Tensor-parallel benchmark points (blitzgen beside gpt-fast's tp.py under torchrun), one JSON line
# per side per point appended to $RESULTS (default $OUT/tp_points.jsonl, else ./tp_points.jsonl).
# Usage: benchmarks/tp_runs.sh SET [GPT_FAST_DIR]
#   SET: x2 | x4 | x8 (the points that machine kind runs) | check (TP 1 on CPU, tiny shape)
# A point already in $RESULTS is skipped, so the script can be called again after a time limit.
set -u
SET=${1:?usage: tp_runs.sh x2|x4|x8|check [GPT_FAST_DIR]}
PEER_DIR=${2:-.peers/gpt-fast}
RESULTS=${RESULTS:-${OUT:-.}/tp_points.jsonl}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
HERE=$(cd "$(dirname "$0")" && pwd)
case $SET in
  x2) POINTS="llama-2-7b:bf16:2 llama-2-7b:int8:2 llama-3-8b:bf16:2 llama-3-8b:int8:2
              llama-2-70b:int8:2 llama-2-70b:int4:2" ;;
  x4) POINTS="llama-2-7b:bf16:1 llama-2-7b:int8:1 llama-3-8b:bf16:1 llama-3-8b:int8:1
              llama-2-7b:bf16:2 llama-2-7b:int8:2 llama-3-8b:bf16:2 llama-3-8b:int8:2
              llama-2-7b:bf16:4 llama-2-7b:int8:4 llama-3-8b:bf16:4 llama-3-8b:int8:4
              llama-2-70b:int8:2 llama-2-70b:int4:2 llama-2-70b:int8:4 llama-2-70b:int4:4 llama-2-70b:bf16:4" ;;
  x8) POINTS="llama-2-7b:bf16:8 llama-2-70b:bf16:8 llama-2-70b:int8:8 llama-2-70b:int4:8" ;;
  check) POINTS="tiny:bf16:1" ;;
  *) echo "unknown set $SET (x2 | x4 | x8 | check)" >&2; exit 2 ;;
esac
for p in $POINTS; do
  IFS=: read -r shape mode tp <<< "$p"
  if [ -f "$RESULTS" ] && grep -q "\"shape\": \"$shape\", \"mode\": \"$mode\", \"group_size\": [^,]*, \"tp\": $tp," "$RESULTS"; then
    echo "skip $p (in $RESULTS)" >&2; continue
  fi
  if [ "$SET" = check ]; then
    extra="--device cpu --no-compile --new-tokens 8 --runs 1 --peer-shape stories15M"
  else
    extra="--allreduce"
  fi
  echo "== $p" >&2
  python "$HERE/tp_bench.py" --shape "$shape" --mode "$mode" --tp "$tp" --prompt-len 5 --new-tokens 200 \
      --runs 5 --peer "gpt-fast=$PEER_DIR" $extra | tee -a "$RESULTS"
done
