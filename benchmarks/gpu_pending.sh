#!/usr/bin/env bash
# The GPU measurements still owed, in device calls of under 10 minutes each. Run from the
# repository root on the device machine (after `export PYTHONPATH=$PWD/src:/tmp/site`, the gguf
# wheel installed there):
#
#   bash benchmarks/gpu_pending.sh suite      # the whole GPU suite: session 19's last fix (a new graph pool
#                                             # after a recapture, test_captured_ngram_rounds_...) never ran
#   bash benchmarks/gpu_pending.sh attention  # decode attention sweep (cut at 200 s in session 17: its own call)
#   bash benchmarks/gpu_pending.sh rows       # int4 row decodes per row count; verify cost per decode; Llama-3-8B
#                                             # p4000 against gpt-fast (carry .peers: gpt-fast exported by `fetch`)
#   bash benchmarks/gpu_pending.sh spec DIR   # speculation on SmolLM2's real weights (session 19: n-gram 0.97-2.38x
#                                             # with captured rounds; self-int4 0.80x once, unexplained). DIR holds the GGUF
#                                             # split in two (split -b 49M model.gguf DIR/model.gguf.part-): carry
#                                             # part-aa in one call and copy it to /tmp/smol, then part-ab in the
#                                             # next call at once (the machine goes back after 30 s idle)
#
# Every result goes to $OUT (at most 8 files come back); record them in BENCHMARKS.md with the card,
# torch version, commit and these commands.
set -uo pipefail
OUT=${OUT:-out/gpu_pending}
mkdir -p "$OUT"
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-8}
log() { echo "== $(date +%T) $*"; }
head_line() { nvidia-smi --query-gpu=name --format=csv,noheader | head -1; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; git rev-parse --short HEAD 2>/dev/null || true; }

case "${1:-}" in
suite)
  head_line
  log "GPU suite"
  TORCHINDUCTOR_COMPILE_THREADS=2 timeout 300 python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider tests/gpu \
    2>&1 | tail -25 | tee "$OUT/suite.txt"
  ;;
attention)
  head_line
  log "decode attention sweep"
  timeout 560 python3 benchmarks/attention_gpu.py --out "$OUT/attention.json" 2>&1 | tail -40
  ;;
rows)
  head_line
  log "int4 row decodes (us per call; a column per decode)"
  timeout 150 python3 benchmarks/rows_gpu.py --rows 1,2,4,5,8,16,64,128 --json "$OUT/rows.json" 2>&1 | tail -40
  for d in convert words; do
    log "verify cost, int4, BLITZGEN_INT4_ROWS=$d"
    BLITZGEN_INT4_ROWS=$d timeout 120 python3 benchmarks/speculative_bench.py shapes --shape llama-2-7b \
      --modes int4 --k 3,7 --how cudagraph --budget 110 --json "$OUT/verify_$d.json" 2>&1 | tail -8
  done
  log "Llama-3-8B bf16, prompt 4000 / 256 new, against gpt-fast (TTFT against the matmul roofline)"
  timeout 280 python3 -m blitzgen bench --shape llama-3-8b --prompt-len 4000 --new-tokens 256 --runs 3 --warmup 1 \
    --peer gpt-fast=.peers/gpt-fast --json "$OUT/l3_p4000.json" 2>&1 | tail -25
  ;;
spec)
  dir=${2:?the directory with the GGUF parts}
  head_line
  log "speculation on real weights (SmolLM2-135M-Instruct), compiled"
  timeout 540 python3 benchmarks/speculative_bench.py real --model "$dir" --sources ngram,self-int4 --k 4 \
    --new-tokens 200 --runs 3 --compile --budget 520 --json "$OUT/spec_real.json" 2>&1 | tail -30
  ;;
*)
  echo "usage: bash benchmarks/gpu_pending.sh suite|attention|rows|spec DIR" >&2
  exit 2
  ;;
esac
