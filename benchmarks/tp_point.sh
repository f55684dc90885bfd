#!/usr/bin/env bash
# One tensor-parallel benchmark point in one call: `blitzgen bench --tp N` (its own launcher, random
# weights of SHAPE made on each rank, only that rank's slices; all-reduce choices timed) beside
# gpt-fast's harness under torchrun with N ranks (gpt-fast's tp.py), same shape, mode and lengths.
# Usage: benchmarks/tp_point.sh SHAPE MODE TP [GPT_FAST_DIR]     (MODE: bf16 | int8 | int4)
# Writes $OUT/tp_SHAPE_MODE_tpN.json (default OUT: .) and prints the table; exit 1 if the peer failed.
set -u
SHAPE=${1:?usage: tp_point.sh SHAPE MODE TP [GPT_FAST_DIR]}
MODE=${2:?mode: bf16 | int8 | int4}
TP=${3:?tensor-parallel ranks}
PEER_DIR=${4:-.peers/gpt-fast}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
Q=(); [ "$MODE" = bf16 ] || Q=(--quantize "$MODE")
P=(); [ -f "$PEER_DIR/tp.py" ] && P=(--peer "gpt-fast=$PEER_DIR" --peer-timeout 300)
[ ${#P[@]} -eq 0 ] && echo "no gpt-fast files in $PEER_DIR: blitzgen only" >&2
[ "$TP" -gt 1 ] && P+=(--time-all-reduce)
python -m blitzgen bench --shape "$SHAPE" "${Q[@]}" --tp "$TP" --prompt-len 5 --new-tokens 200 --runs 5 \
    "${P[@]}" --json "${OUT:-.}/tp_${SHAPE}_${MODE}_tp${TP}.json"
