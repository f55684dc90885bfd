"""The Triton kernels on the GPU against their plain-PyTorch references: int8 / int4 GEMV at
Llama-7B/8B shapes and odd ones, the split-K decode attention, and a quantized model's decode
really running the GEMV kernels (no silent fallback). Inputs are fresh random numbers each run
(the seed is in every failure message); outputs are poisoned with NaN where the launcher allows."""

from __future__ import annotations

import math
import random

import pytest
import torch

from blitzgen import kernels, runtime
from blitzgen.kernels.reference import dequantize_int4_ref, int4_gemv_ref, int8_gemv_ref

from .common import random_model

pytestmark = pytest.mark.gpu

# (N, K) = (out, in): Llama-2-7B attention / MLP up / MLP down, Llama-3-8B MLP up; then odd shapes
# (N tails, K tails, split-K candidates).
BIG = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
ODD = [(37, 1024), (40, 1536), (24, 2560), (1000, 3072)]
KINDS = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.fixture
def seed():
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def _inputs(kind, N, K, g, dtype):
    x = torch.randn(1, 1, K, device="cuda").to(dtype)
    if kind == "int8":
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8, device="cuda")
        w[0, :4] = torch.tensor([-128, 127, -1, 0], dtype=torch.int8)  # extremes
        s = (torch.rand(N, device="cuda") * 0.02 + 1e-3).to(dtype)
        return x, (w, s), int8_gemv_ref(x, w, s)
    qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    qw[0, :2] = torch.tensor([0x0F, 0xF0], dtype=torch.uint8)
    sc = (torch.rand(N, K // g, device="cuda") * 0.02 + 1e-3).to(dtype)
    z = (torch.randn(N, K // g, device="cuda") * 0.02).to(dtype)
    return x, (qw, sc, z, g), int4_gemv_ref(x, qw, sc, z, g)


def _tol(dtype, kernel=None):
    """fp16x2 int4 kernels: fp16 sums over a tile (~1e-3) exceed fp16's own output rounding."""
    return max(TOL[dtype], 1e-2) if kernel in ("h2", "h2p") else TOL[dtype]


def _check(y, r, tol, what):
    assert y.shape == r.shape and y.dtype == r.dtype, (what, y.shape, r.shape, y.dtype, r.dtype)
    y32, r32 = y.float(), r.float()
    assert torch.isfinite(y32).all(), f"{what}: non-finite output (an element never written?)"
    err = (y32 - r32).abs()
    bound = tol * (r32.abs() + r32.abs().mean())
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), f"{what}: element {worst} = {float(y32.flatten()[worst])}, " \
                                       f"reference {float(r32.flatten()[worst])}"
    rel = float((y32 - r32).norm() / r32.norm())
    assert rel < tol, f"{what}: relative error {rel:.2e}"
    return rel


@pytest.mark.parametrize("kind,g", KINDS, ids=["int8", "int4g32", "int4g64", "int4g128"])
def test_gemv_kernels_match_reference(kind, g, seed, summary):
    """The op (what decode calls) at every shape; the raw launcher with a NaN-poisoned output, for
    int4 with the fp32 kernel and with the default one."""
    from blitzgen.kernels import gemv

    assert kernels.available(), kernels.unavailable_reason()
    default = gemv.int4_kernel_choice() if kind == "int4" else None
    worst = 0.0
    for N, K in BIG + ODD:
        for dtype in (torch.bfloat16,) if (N, K) in BIG[1:] else (torch.bfloat16, torch.float16):
            x, args, r = _inputs(kind, N, K, g, dtype)
            what = f"{kind} g={g} N={N} K={K} {dtype} seed={seed}"
            op = kernels.int8_gemv if kind == "int8" else kernels.int4_gemv
            worst = max(worst, _check(op(x, *args), r, _tol(dtype, default), what + f" (op, {default})"))
            for kernel in [None] if kind == "int8" else sorted({"fp32", default}):
                cfg = gemv.choose_config(kind, N, K, g, gemv._device_sms(x), kernel=kernel)
                poison = torch.full((N,), float("nan"), dtype=dtype, device="cuda")
                out = poison if cfg.split_k == 1 else None
                y = (gemv.int8_gemv_raw(x, *args, cfg=cfg, out=out) if kind == "int8"
                     else gemv.int4_gemv_raw(x, *args, cfg=cfg, out=out, kernel=kernel))
                worst = max(worst, _check(y, r, _tol(dtype, kernel), f"{what} raw {kernel} {cfg}"))
    summary(f"{len(BIG) + len(ODD)} shapes, worst relative error {worst:.1e}")


@pytest.mark.parametrize("kind,g", KINDS, ids=["int8", "int4g32", "int4g64", "int4g128"])
def test_row_matmul_matches_reference(kind, g, seed, summary):
    """The tensor-core row matmul (kernels/mm_rows.py) for 2..16 tokens: the op that the quantized
    layers call, and the raw launcher without split-K and with a deep split, at every shape."""
    from blitzgen.kernels import mm_rows

    worst, n = 0.0, 0
    for N, K in BIG + ODD:
        for rows in (2, 3, 4, 5, 8, 9, 16):
            dtype = torch.float16 if (N, K) in ODD and rows % 2 else torch.bfloat16
            x1, args, _ = _inputs(kind, N, K, g, dtype)
            x = torch.randn(1, rows, K, device="cuda").to(dtype)
            if kind == "int8":  # int8 -> bf16 is exact: the fp32 reference holds
                r = int8_gemv_ref(x, *args)
            else:  # the tile is dequantized to x's dtype before the dot (as tinygemm and F.linear do)
                w = dequantize_int4_ref(*args).to(dtype).float()
                r = (x.float() @ w.t()).to(dtype)
            what = f"{kind} g={g} rows={rows} N={N} K={K} {dtype} seed={seed}"
            op = kernels.int8_rows if kind == "int8" else kernels.int4_rows
            worst = max(worst, _check(op(x, *args), r, TOL[dtype], what + " (op)"))
            raw = mm_rows.int8_mm_rows_raw if kind == "int8" else mm_rows.int4_mm_rows_raw
            cfgs = [mm_rows.MmConfig(block_k=max(128, g or 0)), mm_rows.MmConfig(32, max(256, g or 0), 4, 2, 4)]
            if kind == "int4":  # the other tile decodes (BLITZGEN_INT4_ROWS)
                cfgs += [c._replace(decode=d) for c in cfgs for d in ("magic", "words", "words-xs")]
            for cfg in cfgs:
                worst = max(worst, _check(raw(x, *args, cfg=cfg), r, TOL[dtype], f"{what} {cfg}"))
            n += 1
    summary(f"{n} (shape, rows) cases, worst relative error {worst:.1e}")


@pytest.mark.parametrize("g", [32, 128])
def test_int4_matmul_any_rows_matches_reference(g, seed, summary):
    """kernels.int4_matmul (mm_rows' kernel with 32-128 rows per program, or from 192 rows a float
    copy and cuBLAS: a prefill without tinygemm's packed copy) at every shape and several prefill
    lengths, with row tails; the float copy also in slices of output rows."""
    from blitzgen.kernels import dequant, mm_rows

    worst, n = 0.0, 0
    for N, K in BIG + ODD:
        for rows in (17, 33, 100, 300) if (N, K) in ODD else (17, 300, 1800):
            dtype = torch.float16 if (N, K) in ODD and rows % 2 else torch.bfloat16
            _, args, _ = _inputs("int4", N, K, g, dtype)
            x = torch.randn(1, rows, K, device="cuda").to(dtype)
            w = dequantize_int4_ref(*args).to(dtype).float()
            r = (x.float() @ w.t()).to(dtype)
            what = f"int4 g={g} rows={rows} N={N} K={K} {dtype} seed={seed}"
            worst = max(worst, _check(kernels.int4_matmul(x, *args), r, TOL[dtype], what + " (op)"))
            cfg = mm_rows.MmConfig(64, max(128, g), 4, 3, 2, 32)  # split-K with 32-row tiles
            for c in [cfg] + [cfg._replace(decode=d) for d in ("magic", "words", "words-xs")]:
                worst = max(worst, _check(mm_rows.int4_mm_rows_raw(x, *args, cfg=c, max_rows=None), r, TOL[dtype],
                                          f"{what} {c}"))
            y = dequant.int4_dequant_mm(x, *args, chunk_elems=N * K // 3)
            worst = max(worst, _check(y, r, TOL[dtype], f"{what} dequantize + cuBLAS in slices"))
            n += 1
    summary(f"{n} (shape, rows) cases, worst relative error {worst:.1e}")


def test_int8_matmul_any_rows_matches_reference(seed, summary):
    """kernels.int8_matmul (the row kernel with more rows per program, or from 192 rows a float copy
    and cuBLAS), and the float copy against the exact one."""
    from blitzgen.kernels import dequant, mm_rows

    worst, n = 0.0, 0
    for N, K in BIG + ODD:
        for rows in (17, 33, 100, 300) if (N, K) in ODD else (17, 300, 1800):
            dtype = torch.float16 if (N, K) in ODD and rows % 2 else torch.bfloat16
            _, args, _ = _inputs("int8", N, K, None, dtype)
            x = torch.randn(1, rows, K, device="cuda").to(dtype)
            w, s = args
            r = int8_gemv_ref(x, *args)  # exact products, then the scale
            wd = (w.float() * s.float()[:, None]).to(dtype).float()  # the float copy holds w * s in x's dtype
            r_deq = (x.float() @ wd.t()).to(dtype)
            what = f"int8 rows={rows} N={N} K={K} {dtype} seed={seed}"
            r_op = r_deq if rows >= mm_rows.INT8_DEQUANT_ROWS else r
            worst = max(worst, _check(kernels.int8_matmul(x, *args), r_op, TOL[dtype], what + " (op)"))
            y = dequant.int8_dequant_mm(x, *args, chunk_elems=N * K // 3)
            worst = max(worst, _check(y, r_deq, TOL[dtype], f"{what} dequantize + cuBLAS in slices"))
            assert torch.equal(dequant.int8_dequant(w, s, torch.float32), w.float() * s.float()[:, None])
            n += 1
    summary(f"{n} (shape, rows) cases, worst relative error {worst:.1e}")


def test_int4_prefill_without_tinygemm_copy(monkeypatch, summary):
    """BLITZGEN_INT4_PREFILL=triton (the default): no packed copy is built, and a 40-token and a
    300-token prefill (dequantize + cuBLAS) plus decode give the logits of the tinygemm model."""
    from blitzgen.quant import Int4Linear

    ids = torch.randint(0, 32000, (1, 300), device="cuda")
    pos = torch.arange(300, device="cuda")
    out = {}
    for choice in ("tinygemm", "triton"):
        monkeypatch.setenv("BLITZGEN_INT4_PREFILL", choice)
        model = random_model(quantize="int4", group_size=32, n_layers=2, cache=512)
        mods = [m for m in model.modules() if isinstance(m, Int4Linear)]
        copies = sum(m.packed_weight is not None for m in mods)
        assert copies == (len(mods) if choice == "tinygemm" else 0), (choice, copies)
        with torch.inference_mode():
            out[choice] = (model(ids[:, :40], pos[:40]).float(), model(ids, pos).float(),
                           model(ids[:, :1], pos[-1:] + 1).float())
        del model
    for a, b in zip(out["tinygemm"], out["triton"]):
        rel = float((a - b).norm() / b.norm())
        assert rel < 2e-2, rel
    summary(f"prefill and decode logits agree (relative {rel:.1e}); no packed copy")


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("kernel", ["h2", "h2p"])
def test_int4_packed_kernel_matches_reference(kernel, g, seed, summary):
    """gemv_int4_h2 (fp16x2 dequantize and products) against the fp32 reference: every shape,
    bf16 and fp16 activations, every candidate config at two shapes (split-K and K tails
    included), with a NaN-poisoned output."""
    from blitzgen.kernels import gemv

    worst, n = 0.0, 0
    for N, K in BIG + ODD:
        for dtype in (torch.bfloat16,) if (N, K) in BIG[1:] else (torch.bfloat16, torch.float16):
            x, args, r = _inputs("int4", N, K, g, dtype)
            sms = gemv._device_sms(x)
            cfgs = [gemv.choose_config("int4", N, K, g, sms, kernel=kernel)]
            if (N, K) in [(4096, 4096), (40, 1536)] and dtype == torch.bfloat16:
                cfgs = gemv.candidate_configs("int4", N, K, g, sms, kernel=kernel)
            for cfg in cfgs:
                poison = torch.full((N,), float("nan"), dtype=dtype, device="cuda")
                y = gemv.int4_gemv_raw(x, *args, cfg=cfg, out=poison if cfg.split_k == 1 else None,
                                       kernel=kernel)
                worst = max(worst, _check(y, r, _tol(dtype, kernel), f"{kernel} g={g} N={N} K={K} {dtype} {cfg} seed={seed}"))
                n += 1
    summary(f"g{g}: {n} launches, worst relative error {worst:.1e}")


@pytest.mark.parametrize("kernel", ["h2", "h2p"])
def test_int4_packed_kernel_large_activations_and_emulation(kernel, seed, summary):
    """Large activations (fp16 holds |x| to ~1.5e4; past ~32760 rows are redone in fp32) and the
    kernel against its own CPU emulation."""
    from blitzgen.kernels import gemv, gemv_int4_h2

    x, (qw, sc, z, g), _ = _inputs("int4", 4096, 4096, 32, torch.bfloat16)
    for scale in (3000.0, 1e5):  # |x| to ~1.5e4 (fp16 holds it) and to ~5e5 (the fp32 fallback)
        big = (x.float() * scale).to(torch.bfloat16)
        r = int4_gemv_ref(big, qw, sc, z, g)
        _check(gemv.int4_gemv_raw(big, qw, sc, z, g, kernel=kernel), r, TOL[torch.bfloat16],
               f"{kernel} x * {scale:g}")
    # the kernel computes what its CPU emulation computes: fp16 activations and output (finer than
    # bf16, so an exact fp32-product kernel would be told apart), within one fp16 step per element
    x16, (qw, sc, z, g), _ = _inputs("int4", 4096, 4096, 32, torch.float16)
    y = gemv.int4_gemv_raw(x16, qw, sc, z, g, cfg=gemv.GemvConfig(8, 2, 4, 1, 1), kernel=kernel).flatten()
    em = gemv_int4_h2.emulate(x16.flatten().cpu(), qw.cpu(), sc.cpu(), z.cpu(), g).to(y.device)
    em16 = em.to(torch.float16).float()
    step = (em16.abs() * 2.0 ** -10).clamp(min=2.0 ** -24)  # one fp16 ulp (upper bound)
    off = int(((y.float() - em16).abs() > step * 1.01).sum())
    assert off <= y.numel() // 100, f"{kernel}: {off} of {y.numel()} elements more than one fp16 step from its emulation"
    emu = float((y.float() - em).norm() / em.norm())
    summary(f"{off} of {y.numel()} elements past one fp16 step; {emu:.1e} from the CPU emulation")


@pytest.mark.parametrize("kind,g", [("int8", None), ("int4", 32)], ids=["int8", "int4g32"])
def test_gemv_candidate_configs(kind, g, seed, summary):
    """Every config the autotuner or the benchmark may pick, at two shapes (incl. split-K)."""
    from blitzgen.kernels import gemv

    n = 0
    for N, K in [(4096, 4096), (40, 1536)]:
        x, args, r = _inputs(kind, N, K, g, torch.bfloat16)
        raw = gemv.int8_gemv_raw if kind == "int8" else gemv.int4_gemv_raw
        for cfg in gemv.candidate_configs(kind, N, K, g, gemv._device_sms(x)):
            poison = torch.full((N,), float("nan"), dtype=torch.bfloat16, device="cuda")
            y = raw(x, *args, cfg=cfg, out=poison if cfg.split_k == 1 else None)
            _check(y, r, TOL[torch.bfloat16], f"{kind} N={N} K={K} {cfg} seed={seed}")
            n += 1
    summary(f"{n} configs")


def test_float_gemv_kernel(seed, summary):
    """The opt-in unquantized GEMV (kernels/gemv_float.py): op and raw launcher (poisoned out)."""
    from blitzgen.kernels import gemv, gemv_float
    from blitzgen.kernels.reference import float_gemv_ref

    worst = 0.0
    for N, K in BIG + ODD:
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(1, 1, K, device="cuda").to(dtype)
            w = (torch.randn(N, K, device="cuda") * 0.02).to(dtype)
            r = float_gemv_ref(x, w)
            what = f"float GEMV N={N} K={K} {dtype} seed={seed}"
            worst = max(worst, _check(gemv_float.float_gemv(x, w), r, TOL[dtype], what + " (op)"))
            cfg = gemv_float.choose_config(N, K, gemv._device_sms(x))
            poison = torch.full((N,), float("nan"), dtype=dtype, device="cuda")
            y = gemv_float.float_gemv_raw(x, w, cfg, out=poison if cfg.split_k == 1 else None)
            worst = max(worst, _check(y, r, TOL[dtype], f"{what} raw {cfg}"))
    summary(f"{len(BIG) + len(ODD)} shapes, worst relative error {worst:.1e}")


def _attention_ref(q, k, v, mask):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(~mask.view(1, 1, 1, -1), -float("inf")).softmax(-1) @ v.double()


def _attention_inputs(hkv, g, S, D, dtype, filled):
    """q, k, v and the mask of the first ``filled`` positions; the keys past them hold NaN (never to be read)."""
    q = torch.randn(1, hkv, g, D, device="cuda").to(dtype)
    k = torch.randn(1, hkv, S, D, device="cuda").to(dtype)
    v = torch.randn(1, hkv, S, D, device="cuda").to(dtype)
    mask = torch.zeros(S, dtype=torch.bool, device="cuda")
    mask[:filled] = True
    k[:, :, filled:], v[:, :, filled:] = float("nan"), float("nan")
    return q, k, v, mask


def _check_attention(y, q, r, what) -> float:
    assert y.shape == q.shape and y.dtype == q.dtype and torch.isfinite(y).all(), what
    rel = float((y.double() - r).norm() / r.norm())
    assert rel < {torch.float32: 1e-5}.get(q.dtype, 1e-2), f"{what}: relative error {rel:.2e}"
    return rel


# (KV heads, group, cache length, head dim, dtype, filled positions)
ATTN = [(8, 4, 4096, 128, torch.bfloat16, 4000),  # Llama-3-8B at 4k
        (32, 1, 2048, 128, torch.bfloat16, 1800),  # Llama-2-7B (no GQA)
        (8, 4, 8192, 128, torch.bfloat16, 5001),
        (4, 4, 300, 64, torch.float16, 211),
        (2, 8, 64, 128, torch.bfloat16, 1),
        (4, 2, 1000, 64, torch.float32, 999),
        (8, 4, 8192, 128, torch.bfloat16, 200)]  # a server's static cache, short fill


@pytest.mark.parametrize("with_pos", [False, True], ids=["mask", "pos"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_decode_attention_kernel(compiled, with_pos, seed, summary):
    """Against float64; with_pos: told the query's position, the kernel stops there (the mask
    then lets later keys through, and they hold NaN: visiting one would show)."""
    from blitzgen.kernels.attention import decode_attention

    if compiled:  # the other with_pos case's 7 graphs would pass Dynamo's recompile limit of 8
        torch._dynamo.reset()
    fn = torch.compile(decode_attention, fullgraph=True, dynamic=False) if compiled else decode_attention
    worst = 0.0
    for hkv, g, S, D, dtype, filled in ATTN:
        q, k, v, mask = _attention_inputs(hkv, g, S, D, dtype, filled)
        if with_pos:
            pos = torch.tensor([filled - 1], device="cuda")
            y = fn(q, k, v, torch.ones_like(mask).view(1, 1, 1, S), pos)
        else:
            y = fn(q, k, v, mask.view(1, 1, 1, S))
        r = _attention_ref(q, k[:, :, :filled], v[:, :, :filled], mask[:filled])
        what = f"attention Hkv={hkv} G={g} S={S} D={D} filled={filled} {dtype} seed={seed}"
        worst = max(worst, _check_attention(y, q, r, what))
    summary(f"{len(ATTN)} shapes, worst relative error {worst:.1e}")


@pytest.mark.parametrize("kw", [dict(pos_loads=True), dict(merge="triton"), dict(pos_loads=True, merge="triton"),
                                dict(pos_loads=True, merge="triton", programs_per_sm=0),
                                dict(pos_loads=True, merge="triton", elementwise=True)],
                         ids=["pos-loads", "triton-merge", "both", "one-slice", "elementwise"])
def test_decode_attention_kernel_variants(kw, seed, summary):
    """The split kernel's swept variants (benchmarks/attention_gpu.py): loads bounded by the position
    only, with masked rows inside it holding NaN, the one-launch merge that reads only the slices
    up to the position, and one slice (no merge)."""
    from blitzgen.kernels.attention import decode_attention_raw

    worst = 0.0
    for hkv, g, S, D, dtype, filled in ATTN:
        q, k, v, mask = _attention_inputs(hkv, g, S, D, dtype, filled)
        hole = slice(filled // 3, filled // 3 + 5) if filled > 20 else slice(0, 0)
        mask[hole] = False
        v[:, :, hole] = float("nan")
        y = decode_attention_raw(q, k, v, mask.view(1, 1, 1, S), torch.tensor([filled - 1], device="cuda"), **kw)
        kk, vv = k[:, :, :filled].clone(), v[:, :, :filled].clone()
        kk[:, :, hole], vv[:, :, hole] = 0, 0
        r = _attention_ref(q, kk, vv, mask[:filled])
        what = f"attention {kw} Hkv={hkv} G={g} S={S} D={D} filled={filled} {dtype} seed={seed}"
        worst = max(worst, _check_attention(y, q, r, what))
    summary(f"{len(ATTN)} shapes, worst relative error {worst:.1e}")


def _decode_kernel_launches(model, name: str) -> int:
    from torch.profiler import ProfilerActivity, profile

    tok = torch.tensor([[1]], device="cuda")
    pos = torch.tensor([3], device="cuda")
    with torch.inference_mode():
        model(tok, pos)  # compile the kernels outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(tok, pos)
            torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if name in e.key)


@pytest.mark.parametrize("scheme,g", [("int8", None), ("int4", 128)], ids=["int8", "int4g128"])
def test_quantized_decode_uses_the_triton_kernels(scheme, g, monkeypatch, caplog, summary):
    """No silent fallback: every quantized layer holds the kernel hook, one eager decode step
    launches the GEMV kernel once per layer, and nothing reports a fallback."""
    from blitzgen.quant import Int4Linear, Int8Linear

    monkeypatch.setattr(runtime, "_REPORTED", set())
    caplog.set_level("WARNING", logger="blitzgen")
    assert kernels.available(), kernels.unavailable_reason()
    model = random_model(quantize=scheme, group_size=g, n_layers=2)
    mods = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert len(mods) == 2 * 4 + 1 and all(m._gemv is not None for m in mods)
    from blitzgen.kernels import gemv

    packed = scheme == "int4" and gemv.int4_kernel_choice() != "fp32"
    launches = _decode_kernel_launches(model, "int4_h2_gemv_kernel" if packed else f"{scheme}_gemv_kernel")
    assert launches >= len(mods), f"{launches} GEMV kernel launches for {len(mods)} quantized layers"
    falls = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert not falls, falls
    summary(f"{launches} {scheme} GEMV launches per decode step for {len(mods)} layers")


def test_disabled_kernels_report_and_still_decode(summary):
    """BLITZGEN_KERNELS=0 on a GPU: the int8 model says once why it is slower, and still decodes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import logging, torch; logging.basicConfig()\n"
            "from tests.gpu.common import random_model\n"
            "m = random_model(quantize='int8', n_layers=1)\n"
            "with torch.inference_mode():\n"
            "    y = m(torch.tensor([[1]], device='cuda'), torch.tensor([0], device='cuda'))\n"
            "assert torch.isfinite(y).all()\nprint('decoded')\n")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "BLITZGEN_KERNELS": "0",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "decoded" in r.stdout, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if "falls back to a slower path" in ln and "int8_gemv" in ln]
    assert len(lines) == 1 and "BLITZGEN_KERNELS=0" in lines[0], r.stderr[-3000:]  # once, with the reason
    summary(lines[0].split("blitzgen: ", 1)[-1][:120])


# ---------------------------------------------------------------- fused decode GEMVs (fused_gemv.py)

# (K, N, flags): Llama-2-7B / Llama-3-8B roles: wqkv (norm), wo (residual), w13 (norm + SwiGLU: N
# outputs from 2N rows), w2 (residual); then odd shapes (tails, split-K)
FUSED = [(4096, 12288, "norm"), (4096, 4096, "res"), (4096, 11008, "swiglu"), (11008, 4096, "res"),
         (4096, 14336, "swiglu"), (14336, 4096, "res"), (4096, 6144, "norm"),
         (1536, 37, "norm"), (3072, 1000, "swiglu"), (2560, 24, "res")]


def _fused_case(kind, g, K, N, flags, dtype):
    from blitzgen.kernels import reference as R

    swiglu = flags == "swiglu"
    rows = 2 * N if swiglu else N
    x = torch.randn(1, 1, K, device="cuda").to(dtype)
    kw = dict(norm_weight=(torch.rand(K, device="cuda") + 0.5).to(dtype) if flags != "res" else None,
              eps=1e-5, residual=torch.randn(1, 1, N, device="cuda").to(dtype) if flags == "res" else None,
              swiglu=swiglu)
    if kind == "bf16":
        w = (torch.randn(rows, K, device="cuda") * 0.02).to(dtype)
        return (x, w), kw, R.fused_float_gemv_ref(x, w, **kw)
    x_, (w, *rest), _ = _inputs(kind, rows, K, g, dtype)
    if kind == "int8":
        return (x, w, *rest), kw, R.fused_int8_gemv_ref(x, w, *rest, **kw)
    return (x, w, *rest), kw, R.fused_int4_gemv_ref(x, w, *rest, **kw)


@pytest.mark.parametrize("kind,g", [("bf16", None)] + KINDS, ids=["bf16", "int8", "int4g32", "int4g64", "int4g128"])
def test_fused_gemv_kernels_match_reference(kind, g, seed, summary):
    """The fused ops (what fused decode calls) and the raw launchers with NaN-poisoned outputs."""
    from blitzgen.kernels import fused_gemv as fg
    from blitzgen.kernels import gemv

    op = {"bf16": kernels.fused_float_gemv, "int8": kernels.fused_int8_gemv, "int4": kernels.fused_int4_gemv}[kind]
    raw = {"bf16": fg.fused_float_gemv_raw, "int8": fg.fused_int8_gemv_raw, "int4": fg.fused_int4_gemv_raw}[kind]
    worst = 0.0
    for K, N, flags in FUSED:
        for dtype in (torch.bfloat16, torch.float16) if N < 4096 else (torch.bfloat16,):
            args, kw, r = _fused_case(kind, g, K, N, flags, dtype)
            what = f"fused {kind} g={g} K={K} N={N} {flags} {dtype} seed={seed}"
            worst = max(worst, _check(op(*args, **kw), r, TOL[dtype], what + " (op)"))
            rows = 2 * N if flags == "swiglu" else N
            cfg = fg._config("float" if kind == "bf16" else kind, rows, K, g, args[0], flags == "swiglu")
            poison = torch.full((N,), float("nan"), dtype=dtype, device="cuda")
            y = raw(*args, **kw, cfg=cfg, out=poison if cfg.split_k == 1 else None)
            worst = max(worst, _check(y, r, TOL[dtype], f"{what} raw {cfg}"))
            if kind != "bf16" and (K, N) == (1536, 37):  # every candidate config at one small shape
                for c in gemv.candidate_configs(kind, rows, K, g, gemv._device_sms(args[0])):
                    y = raw(*args, **kw, cfg=c)
                    _check(y, r, TOL[dtype], f"{what} raw {c}")
    summary(f"{len(FUSED)} shapes, worst relative error {worst:.1e}")


@pytest.mark.parametrize("scheme,g", [(None, None), ("int8", None), ("int4", 32)], ids=["bf16", "int8", "int4g32"])
def test_fused_decode_compiled_matches_eager_plain(scheme, g, summary):
    """The CUDA-graph decode with fused blocks (BLITZGEN_FUSED) against the eager plain model, token
    by token (teacher forcing), and the fused kernels really launched (no silent fallback)."""
    from blitzgen.generate import Generator
    from blitzgen.runtime import RuntimeOptions

    from .common import GREEDY, check_greedy

    oracle = random_model(quantize=scheme, group_size=g, cache=512)
    opts = RuntimeOptions(device="cuda", compile=True, fused_decode=True)
    gen = Generator(random_model(quantize=scheme, group_size=g, cache=256), options=opts)
    assert all(layer.fused_decode is not None for layer in gen.model.layers)
    prompt = [random.Random(7).randrange(1, 32000) for _ in range(21)]
    got = list(gen.generate_ids(prompt, 40, GREEDY, stop_token_ids=()))
    msg = check_greedy(oracle, prompt, got, 0.25)
    kind = {None: "float", "int8": "int8", "int4": "int4"}[scheme]
    launches = _decode_kernel_launches(gen.model, f"fused_{kind}_kernel")
    assert launches == 4 * len(gen.model.layers), launches
    summary(f"{msg}; {launches} fused launches per eager step")
    del gen
    torch.cuda.empty_cache()
