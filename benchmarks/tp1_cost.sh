#!/usr/bin/env bash
# What --tp 1 costs on one GPU, in one call (< 9 min on an H200): `blitzgen bench` on the plain path,
# then the same bench through the tensor-parallel path (--tp 1: a process group of one, the
# loader's shard hook, RowParallel wrappers, the lockstep runner), which is also the exact command
# of a multi-GPU point at TP 1 (benchmarks/tp_point.sh: gpt-fast's harness under torchrun, when
# its files are in GPT_FAST_DIR). Prints one comparison line; JSON in $OUT/tp1_cost/.
# Usage: benchmarks/tp1_cost.sh [SHAPE] [MODE] [GPT_FAST_DIR]      (default llama-2-7b bf16)
set -u
SHAPE=${1:-llama-2-7b}
MODE=${2:-bf16}
PEER_DIR=${3:-.peers/gpt-fast}
DIR=${OUT:-.}/tp1_cost
mkdir -p "$DIR"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
Q=(); [ "$MODE" = bf16 ] || Q=(--quantize "$MODE")
COMMON=(--shape "$SHAPE" "${Q[@]}" --prompt-len 5 --new-tokens 200 --runs 5)
timeout 240 python -m blitzgen bench "${COMMON[@]}" --json "$DIR/plain.json" || echo "plain bench failed ($?)" >&2
OUT=$DIR timeout 330 bash "$ROOT/benchmarks/tp_point.sh" "$SHAPE" "$MODE" 1 "$PEER_DIR" || echo "tp 1 point: exit $?" >&2
python - "$DIR/plain.json" "$DIR/tp_${SHAPE}_${MODE}_tp1.json" <<'PY'
import json, sys
try:
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
except (OSError, ValueError) as e:
    sys.exit(f"no comparison: {e}")
peer = (b.get("peers") or {}).get("gpt-fast") or {}
print(f"{a['shape']} {a['mode']}: plain {a['tok_s']:.2f} tok/s (decode {a['decode_tok_s']:.2f}), --tp 1 "
      f"{b['tok_s']:.2f} tok/s (decode {b['decode_tok_s']:.2f}): {100 * (b['tok_s'] / a['tok_s'] - 1):+.2f}%; "
      f"peak memory {(a.get('peak_memory_bytes') or 0) / 1e9:.2f} / {(b.get('peak_memory_bytes') or 0) / 1e9:.2f} GB; "
      f"gpt-fast under torchrun: {peer.get('tok_s', peer.get('error', 'not run'))}")
PY
