"""Weight-only quantization: int8 (per output channel) and int4 (group-wise): math and modules.

    from blitzgen.quant import Int4Config, make_config, quantize_model
    meta = quantize_model(model, Int4Config(group_size=32))   # or make_config("int8")

``quantize_model`` swaps the model's nn.Linear layers (wqkv, wo, w13, w2 and the output head) in
place for ``Int8Linear`` / ``Int4Linear``, through a registry of handlers keyed by config type
(torchao's ``quantize_(model, Config)`` pattern; one file per scheme: int8.py, int4.py). The token
embedding is never quantized; a tied output head is quantized as its own copy. Math is
round-to-nearest in float32 on the weight's own device; ``loading.load(quantize=...)`` applies the
same per layer while the weights load. ``gptq.py`` is the calibrated alternative for int4 (same
layout). Quantized checkpoints are saved and loaded by ``blitzgen.loading.checkpoint`` (loading
imports quant, never the reverse).

Why our own modules rather than torchao's
-----------------------------------------
torchao 0.18 works (int8 weight-only on CPU and CUDA; its prototype int4 configs on CPU), but its
``Int4WeightOnlyConfig`` needs the ``mslk`` package, which the GPU image lacks, and CUDA. Our own
two small modules instead give:

* full control of the storage layout, which blitzgen.kernels' Triton GEMVs consume directly
  (qweight uint8 [out, in/2], low nibble = even k; scales/zeros [out, in/group]);
* no runtime dependency on torchao;
* exactly gpt-fast's math (``WeightOnlyInt8Linear``; ``group_quantize_tensor`` + tinygemm's
  ``_weight_int4pack_mm``), which inductor fuses well under torch.compile;
* plain tensors in ``state_dict``: safetensors checkpoints need no tensor-subclass serialization.

Custom kernels: when ``blitzgen.kernels`` defines ``int8_gemv(x, weight, scales)`` or
``int4_gemv(x, qweight, scales, zeros, group_size)``, modules on CUDA call them for one-token
inputs (decode); everything else uses aten/inductor. BLITZGEN_QUANT_KERNELS=0 turns the hook off.
"""

from .core import (
    INT4_GROUP_SIZES,
    SCHEMES,
    TARGETS,
    Int4Config,
    Int8Config,
    QuantConfig,
    dequantize_model,
    is_quantized,
    make_config,
    prepare_model,
    quantize_model,
    register_handler,
)
from .int4 import Int4Linear, dequantize_int4, pack_int4, quantize_int4, unpack_int4
from .int8 import Int8Linear, dequantize_int8, quantize_int8

__all__ = [
    "INT4_GROUP_SIZES", "SCHEMES", "TARGETS", "Int4Config", "Int8Config", "QuantConfig", "Int4Linear",
    "Int8Linear", "dequantize_int4", "dequantize_int8", "dequantize_model", "is_quantized", "make_config",
    "pack_int4", "prepare_model", "quantize_int4", "quantize_int8", "quantize_model", "register_handler",
    "unpack_int4",
]
