"""The GEMV and row-matmul Triton kernels compiled for Hopper (sm_90) with Triton's bundled ptxas, no
GPU needed: the layout and register properties the design relies on (16-byte loads, no spills, no
shared memory in the K loop, the int4 decodes' instructions), and the packed int4 kernel's fp16
arithmetic emulated in PyTorch against the reference. Skipped where Triton is not installed."""

from __future__ import annotations

import os

import pytest
import torch

from blitzgen.kernels.reference import int4_gemv_ref


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


needs_triton = pytest.mark.skipif(not _has_triton(), reason="triton is not installed")


def _compile_sm90(kind, cfg, g, has_tail, kernel="fp32"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from blitzgen.kernels import gemv

    ce = {"BN": cfg.block_n, "L": 32 * cfg.num_warps, "WPT": cfg.wpt, "SPLIT_K": cfg.split_k,
          "NUM_STAGES": cfg.num_stages, "HAS_TAIL": has_tail}
    out_t = "*bf16" if cfg.split_k == 1 else "*fp32"
    if kind == "int4":
        fn, extra = gemv._int4_kernel_and_extra(kernel)
        ce["GS"] = g
        ce.update(extra)
        sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": out_t,
               "N": "i32", "K": "i32", "stride_wn": "i32", "stride_sn": "i32", "tiles_per_split": "i32",
               "magic": "i32"}
    else:
        fn = gemv._int8_gemv_kernel
        sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "y_ptr": out_t, "N": "i32", "K": "i32",
               "stride_wn": "i32", "tiles_per_split": "i32", "magic": "i32"}
    n_runtime = len(sig)
    sig.update({k: "constexpr" for k in ce})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(n_runtime - 1)}
    src = ASTSource(fn=fn, signature=sig, constexprs=ce, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": 3})


@needs_triton
@pytest.mark.parametrize("kind,N,K,g", [("int8", 12288, 4096, None), ("int8", 4096, 11008, None),
                                        ("int4", 12288, 4096, 128), ("int4", 4096, 14336, 32)])
def test_sm90_codegen_properties(kind, N, K, g):
    """The heuristic config must compile for Hopper to: 16-byte weight loads, no register spills,
    and no shared-memory traffic inside the K loop (the activation layout matches the weights')."""
    from blitzgen.kernels import gemv

    cfg = gemv.choose_config(kind, N, K, g)
    try:
        c = _compile_sm90(kind, cfg, g, K % gemv.tile_k(kind, cfg) != 0)
    except (ImportError, AttributeError, TypeError) as e:  # compiler API of another Triton version
        pytest.skip(f"cannot drive triton.compile here: {e}")
    ptx = c.asm["ptx"]
    assert "ld.global.v4" in ptx  # vectorized 16-byte weight loads
    assert "ld.local" not in ptx and "st.local" not in ptx  # no spills
    ttgir = c.asm["ttgir"]
    loop = ttgir[ttgir.index("scf.for"):]
    loop = loop[:loop.index("scf.yield")]
    assert "ttg.local_alloc" not in loop and "ttg.local_load" not in loop
    assert c.metadata.shared <= 1024  # only the final cross-warp reduction


@needs_triton
@pytest.mark.parametrize("kernel", ["h2", "h2p"])
@pytest.mark.parametrize("N,K,g", [(12288, 4096, 32), (4096, 11008, 128)])
def test_int4_packed_kernel_sm90_codegen(kernel, N, K, g):
    """gemv_int4_h2 compiles for Hopper with its fp16x2 arithmetic, 16-byte weight loads and no
    spills, at the heuristic config and with a K tail."""
    from blitzgen.kernels import gemv

    cfg = gemv.choose_config("int4", N, K, g)
    try:
        c = _compile_sm90("int4", cfg, g, True, kernel=kernel)
    except (ImportError, AttributeError, TypeError) as e:  # compiler API of another Triton version
        pytest.skip(f"cannot drive triton.compile here: {e}")
    ptx = c.asm["ptx"]
    assert "fma.rn.f16x2" in ptx and "sub.rn.f16x2" in ptx and "cvt.rn.f16x2.f32" in ptx
    assert "ld.global.v4" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx


@pytest.mark.parametrize("N,K,g,scale", [(48, 4096, 32, 1.0), (40, 2048, 128, 300.0), (16, 11008, 64, 0.03)])
def test_int4_packed_emulation_matches_reference(N, K, g, scale):
    """The packed kernel's arithmetic (fp16 products, fp16 sums over a tile, emulated in PyTorch)
    stays within the bf16 output's own rounding of the fp32 reference, at small and large |x|."""
    from blitzgen.kernels import gemv_int4_h2

    gen = torch.Generator().manual_seed(N + K)
    qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    sc = (torch.rand(N, K // g, generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)
    z = (torch.randn(N, K // g, generator=gen) * 0.02).to(torch.bfloat16)
    x = (torch.randn(K, generator=gen) * scale).to(torch.bfloat16)
    ref = int4_gemv_ref(x.double(), qw, sc.double(), z.double(), g).double()  # exact
    em = gemv_int4_h2.emulate(x, qw, sc, z, g).double()
    rel = float((em - ref).norm() / ref.norm())
    # within the bf16 output's own rounding, yet well above fp32 rounding: the fp16 arithmetic is
    # really emulated (an emulation in fp32 would land near 1e-7)
    assert 2e-5 < rel < 1e-3, rel


@needs_triton
def test_float_gemv_sm90_codegen():
    """The unquantized GEMV's default config compiles for Hopper to 16-byte loads, no spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from blitzgen.kernels import gemv_float

    cfg = gemv_float.choose_config(4096, 4096)
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "K": "i32",
           "stride_wn": "i32", "tiles_per_split": "i32"}
    ce = {"BN": cfg.block_n, "BK": cfg.block_k, "SPLIT_K": cfg.split_k, "HAS_TAIL": False}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(sig) - 1)}
    sig.update({k: "constexpr" for k in ce})
    try:
        c = triton.compile(ASTSource(fn=gemv_float._float_gemv_kernel, signature=sig, constexprs=ce, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    except (ImportError, AttributeError, TypeError) as e:  # compiler API of another Triton version
        pytest.skip(f"cannot drive triton.compile here: {e}")
    ptx = c.asm["ptx"]
    assert "ld.global.v4" in ptx and "ld.local" not in ptx and "st.local" not in ptx


@needs_triton
@pytest.mark.parametrize("decode", ["convert", "magic", "words", "words-xs"])
def test_int4_row_decodes_sm90_codegen(decode):
    """The int4 row kernel's tile decodes compile for Hopper (bf16, the 7B tile) without spills, and
    only ``convert`` turns nibbles into floats with I2F (a quarter of the FMA rate on sm_90; the
    others, a shift and a LOP3)."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from blitzgen.kernels import mm_rows

    words = decode.startswith("words")
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32" if words else "*u8", "s_ptr": "*bf16", "z_ptr": "*bf16",
           "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
           "stride_wn": "i32", "stride_sn": "i32", **({"magic": "i32"} if words else {})}
    ce = dict(GS=32, BM=16, BN=64, BK=128, SPLIT_K=1, EVEN_K=True, IEEE=False, NUM_STAGES=3)
    ce.update(X_STRIDED=decode == "words-xs") if words else ce.update(MAGIC=decode == "magic")
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 7, 8, 9, 10, 11)}
    sig.update({k: "constexpr" for k in ce})
    fn = mm_rows._int4_mm_words_kernel if words else mm_rows._int4_mm_kernel
    try:
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    except (ImportError, AttributeError, TypeError) as e:  # compiler API of another Triton version
        pytest.skip(f"cannot drive triton.compile here: {e}")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    if not os.path.exists(tool):
        pytest.skip("no nvdisasm in this Triton")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout
    assert "STL" not in text and "LDL" not in text  # no spills
    i2f = text.count(" I2F")  # per weight element in the K loop (64 here), or a few for the loop's bounds
    assert i2f >= 64 if decode == "convert" else i2f <= 4, i2f
