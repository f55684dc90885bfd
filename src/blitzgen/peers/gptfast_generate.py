"""Peer benchmark: gpt-fast's own ``generate()`` on random weights of one of its named presets.

Run by ``blitzgen bench --peer gpt-fast=DIR`` (and benchmarks/gpu_side_by_side.py) in a process of
its own, so gpt-fast's global inductor flags and module state never reach blitzgen's process.
gpt-fast itself is not part of blitzgen: export its files (model.py, generate.py, quantize.py,
tokenizer.py of github:pytorch-labs/gpt-fast) into a git-ignored folder and pass it as
--gpt-fast-dir (or GPT_FAST_DIR).

What runs is gpt-fast's published configuration: decode_one_token compiled with
mode="reduce-overhead", fullgraph=True (its ``--compile``); prefill eager unless --compile-prefill;
int8 = WeightOnlyInt8QuantHandler, int4 = WeightOnlyInt4QuantHandler(groupsize). The only change
is the int4 packing for torch >= 2.5 (two 4-bit values per uint8 before
``_convert_weight_to_int4pack``), as in shared/peers/gptfast_baseline.py.

Timing is gpt-fast's: generated tokens / wall time of one generate() call (prefill included),
median of --runs after one untimed run (its compile). The time to the first token is taken from the
generate() call to the end of its prefill (one added synchronization). Prints exactly one JSON line on stdout,
starting with {"peer": "gpt-fast", ...}; on failure that line carries "error" and the exit code is 1.

usage: python gptfast_generate.py --gpt-fast-dir DIR --shape Llama-2-7b-chat-hf --mode bf16 \
           --prompt-len 5 --new-tokens 200 --runs 5

Tensor parallel: under ``torchrun --standalone --nproc_per_node N`` it runs gpt-fast's own tp.py
(``maybe_init_dist``, ``apply_tp``). The model is built on the meta device and sharded before its
weights exist, so no rank ever holds the whole model (gpt-fast's CLI shards an mmapped checkpoint);
int8/int4 then quantize each rank's shard. Only rank 0 prints the JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import traceback
import types


def parse_args(argv=None):
    default_dir = os.environ.get("GPT_FAST_DIR") or os.path.join(os.getcwd(), ".peers", "gpt-fast")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpt-fast-dir", default=default_dir)
    p.add_argument("--shape", default="Llama-2-7b-chat-hf", help="a gpt-fast transformer_configs preset")
    p.add_argument("--mode", choices=["bf16", "int8", "int4"], default="bf16")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--prompt-len", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-prefill", action="store_true")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _stub_tokenizer_deps() -> None:
    """gpt-fast's tokenizer.py imports sentencepiece and tiktoken at module level; random-weight
    runs never tokenize, so stand-ins do where those packages are missing."""
    for name in ("sentencepiece", "tiktoken"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    try:
        importlib.import_module("tiktoken.load")
    except ImportError:
        sub = types.ModuleType("tiktoken.load")
        sub.load_tiktoken_bpe = lambda *a, **k: None
        sys.modules["tiktoken.load"] = sub
        sys.modules["tiktoken"].load = sub


def emit(obj: dict) -> None:
    print(json.dumps(dict({"peer": "gpt-fast"}, **obj)), flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    base = dict(shape=a.shape, mode=a.mode, group_size=a.group_size if a.mode == "int4" else None,
                prompt_len=a.prompt_len, new_tokens=a.new_tokens, runs=a.runs, device=a.device,
                compile=a.compile, compile_prefill=a.compile_prefill)
    gdir = os.path.abspath(a.gpt_fast_dir)
    missing = [f for f in ("model.py", "generate.py", "quantize.py", "tokenizer.py")
               if not os.path.isfile(os.path.join(gdir, f))]
    if missing:
        emit(dict(base, error=f"{gdir} lacks gpt-fast's {', '.join(missing)}"))
        return 1
    try:
        return run(a, base, gdir)
    except Exception as e:  # noqa: BLE001 - reported as JSON for the caller
        traceback.print_exc(file=sys.stderr)
        oom = type(e).__name__ == "OutOfMemoryError"
        emit(dict(base, error=("out of memory: " if oom else "") + f"{type(e).__name__}: {e}".splitlines()[0][:500]))
        return 1


def run(a, base: dict, gdir: str) -> int:
    sys.path.insert(0, gdir)
    _stub_tokenizer_deps()
    import torch

    import generate as G  # gpt-fast's; sets its inductor flags at import, as its own CLI does
    import quantize as Q
    from model import Transformer, transformer_configs

    def prep_int4(weight_bf16, groupsize, inner_k_tiles):
        # torch >= 2.5 wants the int4 values packed two to a uint8 before _convert_weight_to_int4pack
        w32, sz = Q.group_quantize_tensor(weight_bf16, n_bit=4, groupsize=groupsize)
        w8 = (w32[:, ::2] << 4 | w32[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(w8, inner_k_tiles), sz

    Q.prepare_int4_weight_and_scales_and_zeros = prep_int4

    device = a.device
    tp_rank = None
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:  # under torchrun: gpt-fast's tp.py
        import tp as TP

        tp_rank = TP.maybe_init_dist()
        device = f"cuda:{tp_rank}"
        base["tp"] = int(os.environ["LOCAL_WORLD_SIZE"])
    is_cuda = device.startswith("cuda")
    if is_cuda and not torch.cuda.is_available():
        raise RuntimeError("CUDA asked for but not available")

    def sync():
        if is_cuda:
            torch.cuda.synchronize()

    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta" if tp_rank is not None else device):
            model = Transformer.from_name(a.shape)
        if tp_rank is not None:
            TP.apply_tp(model)
            model = model.to_empty(device=device)
        with torch.device(device):
            block = model.config.block_size
            if a.prompt_len + a.new_tokens > block:
                raise ValueError(f"prompt {a.prompt_len} + {a.new_tokens} new tokens exceed the preset's "
                                 f"block_size {block}")
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("norm.weight"):
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, 0.02)
            if a.mode == "int8":
                h = Q.WeightOnlyInt8QuantHandler(model)
                sd = h.create_quantized_state_dict()
                model = h.convert_for_runtime()
                model.load_state_dict(sd, assign=True)
            elif a.mode == "int4":
                h = Q.WeightOnlyInt4QuantHandler(model, a.group_size)
                sd = h.create_quantized_state_dict()
                model = h.convert_for_runtime()
                model.load_state_dict({k: v.to(device) for k, v in sd.items()}, assign=True)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to(device).eval()
    sync()
    build_s = time.perf_counter() - t0
    # gpt-fast's own count, taken where its main() takes it: weights without the embedding table,
    # before generate() allocates the KV caches.
    model_size, params = G._get_model_size(model)

    if a.compile:
        G.decode_one_token = torch.compile(G.decode_one_token, mode="reduce-overhead", fullgraph=True)
        if a.compile_prefill:
            G.prefill = torch.compile(G.prefill, fullgraph=True, dynamic=True)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(a.seed)
    prompt = torch.randint(1, min(vocab, 30000), (a.prompt_len,), generator=gen, dtype=torch.int64)
    prompt = prompt.to(dtype=torch.int, device=device)
    rates, ttfts, compile_s = [], [], None
    prefill, t = G.prefill, 0.0

    def timed_prefill(*args, **kwargs):  # the first token: from the generate() call to prefill's result
        out = prefill(*args, **kwargs)
        sync()
        ttfts.append(time.perf_counter() - t)
        return out

    G.prefill = timed_prefill
    for i in range(-1, a.runs):
        torch.manual_seed(a.seed + 1 + i)
        sync()
        t = time.perf_counter()
        y, _ = G.generate(model, prompt, a.new_tokens, batch_size=1, interactive=False, draft_model=None,
                          temperature=a.temperature, top_k=a.top_k)
        sync()
        dt = time.perf_counter() - t
        if i == -1:
            compile_s = dt
            ttfts.clear()
            print(f"warm-up (compile) run: {dt:.1f} s", file=sys.stderr, flush=True)
            continue
        n = y.size(-1) - a.prompt_len
        rates.append(n / dt)
        print(f"run {i + 1}/{a.runs}: {n / dt:.2f} tokens/s", file=sys.stderr, flush=True)
    tok_s = statistics.median(rates)
    gpu = torch.cuda.get_device_name() if is_cuda else "cpu"
    if tp_rank not in (None, 0):
        return 0
    emit(dict(base, preset=a.shape, block_size=block,
              cache_len=getattr(model, "max_seq_length", None), tok_s=tok_s, tok_s_runs=rates,
              bw_gbs=model_size * tok_s / 1e9, model_bytes=model_size, num_params=params,
              ttft_ms=statistics.median(ttfts) * 1e3 if ttfts else None,
              compile_s=compile_s if a.compile else 0.0, warmup_s=compile_s, build_s=build_s,
              peak_memory_bytes=torch.cuda.max_memory_allocated() if is_cuda else None,
              gpu=gpu, torch=torch.__version__,
              configs_known=sorted(transformer_configs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
