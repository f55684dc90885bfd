"""The compiled decode as the verbs build it (RuntimeOptions: compile regions, fused one-token blocks
for unquantized weights), without regions, and with the AOT-saved step (BLITZGEN_AOT_DECODE), each against the
eager plain model, greedy, teacher-forced (tests/gpu/common.check_greedy)."""

from __future__ import annotations

import pytest
import torch

from blitzgen.generate import Generator
from blitzgen.runtime import RuntimeOptions

from .common import GREEDY, check_greedy, random_model

pytestmark = pytest.mark.gpu

TOL = 0.25
NEW = 40
PROMPT = [11, 2024, 7, 31000, 5, 987, 42, 3]


def _ids(gen, n=NEW):
    return list(gen.generate_ids(PROMPT, n, GREEDY, stop_token_ids=()))


@pytest.mark.parametrize("quantize,regions,aot", [(None, None, False), ("int8", None, False), (None, False, False),
                                                  (None, None, True), ("int8", None, True), ("int4", True, False)],
                         ids=["bf16-defaults", "int8-defaults", "bf16-no-regions", "bf16-aot", "int8-aot",
                              "int4-regions"])
def test_compiled_as_shipped_matches_eager_plain(quantize, regions, aot, tmp_path, summary):
    torch._dynamo.reset()
    oracle = random_model(quantize=quantize, cache=1024)
    eager = _ids(Generator(oracle))
    opts = RuntimeOptions(device="cuda", compile=True, compile_regions=regions, aot_decode=aot,
                          cache_dir=str(tmp_path))
    model = random_model(quantize=quantize, cache=256)
    model.compile_regions = opts.regions_for("cuda")  # as loading sets it
    gen = Generator(model, options=opts)
    fused = all(layer.fused_decode is not None for layer in model.layers)
    assert fused == (quantize is None), "fused blocks: on for unquantized weights only"
    got = _ids(gen)
    msg = check_greedy(oracle, PROMPT, got, TOL, eager)
    if aot:
        assert gen._step.status == "compiled", gen._step.status
        torch._dynamo.reset()
        model2 = random_model(quantize=quantize, cache=256)
        model2.compile_regions = model.compile_regions  # the same layout, so the same saved file
        again = Generator(model2, options=opts)  # loads the saved step
        got2 = _ids(again)
        assert again._step.status == "loaded", again._step.status
        msg += "; loaded: " + check_greedy(oracle, PROMPT, got2, TOL, eager)
    summary(f"{quantize or 'bf16'} regions={model.compile_regions} aot={aot} fused={fused}: {msg}")
    del gen
    torch.cuda.empty_cache()


@pytest.mark.parametrize("quantize", [None, "int4"], ids=["bf16", "int4"])
def test_triton_decode_attention_in_the_model(quantize, tmp_path, summary):
    """The compiled decode with the Triton decode attention told the position (a 1024-position
    static cache filled to ~50): against the eager plain model."""
    torch._dynamo.reset()
    oracle = random_model(quantize=quantize, cache=1024)
    eager = _ids(Generator(oracle))
    opts = RuntimeOptions(device="cuda", compile=True, decode_attention="triton", cache_dir=str(tmp_path))
    model = random_model(quantize=quantize, cache=1024)
    model.compile_regions = opts.regions_for("cuda")
    gen = Generator(model, options=opts)
    assert model.attention_op.decode_impl == "triton"
    got = _ids(gen)
    summary(f"{quantize or 'bf16'} triton attention: " + check_greedy(oracle, PROMPT, got, TOL, eager))
    del gen
    torch.cuda.empty_cache()
