"""Quality of weight-only quantization: greedy agreement and KL divergence vs the float model.

    python benchmarks/quant_quality.py [--model PATH] [--device cpu|cuda] [--dtype float32|bfloat16]
                                       [--schemes int8,int4-g32,int4-g64] [--gptq CALIBRATION.txt] [--json OUT]

Teacher-forced over a fixed ~128-token passage (blitzgen.quant.quality.QUALITY_TEXT): one forward
pass of the float model and of each quantized copy; per position, does the argmax agree, and what
is KL(float || quantized)? Also prints the weight bytes read per token and the quantization time.

Caveat for the default model: the SmolLM2-135M GGUF's block weights are already Q4_1 (4-bit,
blocks of 32 along the input dimension), so the "float" reference is itself a dequantized 4-bit
model, and int4 with group size 32 re-quantizes those blocks almost losslessly (its error comes
mostly from the output head, which shares the 8-bit-or-better embedding).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--run-dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the copies compared with the float reference (default: --dtype)")
    p.add_argument("--schemes", default="int8,int4-g32,int4-g64",
                   help="'none' (the float model in --run-dtype); a '-nohead' suffix leaves the output head "
                        "unquantized (the CPU default for a 4-bit GGUF is int4-g32-nohead), '-head8' makes it int8; comma-separated: int8, int4-g32, int4-g64, int4-g128")
    p.add_argument("--text", default=None, help="a text file to use instead of the fixed passage")
    p.add_argument("--gptq", default=None, metavar="FILE",
                   help="also quantize each int4 scheme with GPTQ calibrated on this text file (rows 'int4-gNN-gptq')")
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)

    from blitzgen.errors import BlitzgenError
    from blitzgen.generate import weight_bytes
    from blitzgen.loading import load
    from blitzgen.quant import make_config, quantize_model
    from blitzgen.quant.core import handler_for
    from blitzgen.quant.quality import QUALITY_TEXT, logit_metrics, teacher_forced_logits

    dtype = getattr(torch, a.dtype)
    lm = load(a.model, device=a.device, dtype=dtype, progress=False)
    text = open(a.text, encoding="utf-8").read() if a.text else QUALITY_TEXT
    ids = lm.tokenizer.encode(text)
    ref = teacher_forced_logits(copy.deepcopy(lm.model), ids)
    base_bytes = weight_bytes(lm.model)
    rows = [{"scheme": f"float ({a.dtype})", "agreement": 1.0, "kl": 0.0, "max_kl": 0.0,
             "weight_gb": base_bytes / 1e9, "quant_s": 0.0}]
    specs = [s.strip() for s in a.schemes.split(",")]
    if a.gptq:
        specs += [s + "-gptq" for s in specs if s.startswith("int4")]
        from blitzgen.quant.gptq import calibration_samples, gptq_quantize_model

        samples = calibration_samples(lm.tokenizer, a.gptq, max_tokens=a.calibration_tokens, seq_len=512)
    for spec in specs:
        gptq = spec.endswith("-gptq")
        base = spec.removesuffix("-gptq")
        head8 = base.endswith("-head8")  # the output head as int8 (per channel), the rest as named
        head = not base.endswith("-nohead") and not head8
        name, _, g = base.removesuffix("-nohead").removesuffix("-head8").partition("-g")
        model = copy.deepcopy(lm.model).to(getattr(torch, a.run_dtype or a.dtype))
        try:
            t0 = time.perf_counter()
            if name == "none":
                pass
            elif gptq:
                gptq_quantize_model(model, make_config(name, int(g) if g else None, head=head), samples)
            else:
                quantize_model(model, make_config(name, int(g) if g else None, head=head))
            if head8:
                cfg8 = make_config("int8")
                model.output = handler_for(cfg8).quantize(model.output, cfg8, model.output.weight.dtype)
            secs = time.perf_counter() - t0
        except BlitzgenError as e:
            print(f"{spec}: skipped ({e})", file=sys.stderr)
            continue
        r = logit_metrics(ref, teacher_forced_logits(model, ids))
        rows.append({"scheme": spec, **{k: r[k] for k in ("agreement", "kl", "max_kl")},
                     "weight_gb": _quant_bytes(model) / 1e9, "quant_s": secs})
        del model

    print(f"model: {lm.name} ({lm.kind}), {len(ids)} tokens teacher-forced, {a.device}, {a.dtype}")
    print(f"{'scheme':<18}{'greedy agree':>13}{'mean KL':>10}{'max KL':>9}{'weights GB':>12}{'quantize s':>12}")
    for r in rows:
        print(f"{r['scheme']:<18}{r['agreement']:>12.1%}{r['kl']:>10.4f}{r['max_kl']:>9.3f}"
              f"{r['weight_gb']:>12.3f}{r['quant_s']:>12.2f}")
    if lm.kind == "gguf":
        print("note: this GGUF's weights were already quantized (e.g. Q4_1); the reference is their dequantized "
              "float values")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"model": lm.source, "tokens": len(ids), "device": a.device, "dtype": a.dtype, "rows": rows},
                      fh, indent=2)
    return 0


def _quant_bytes(model) -> int:
    """Bytes read per token: persistent weights only (not the device-specific packed copies), no embedding."""
    total = 0
    for name, t in model.state_dict().items():
        if name != "tok_embeddings.weight":
            total += t.numel() * t.element_size()
    return total


if __name__ == "__main__":
    sys.exit(main())
