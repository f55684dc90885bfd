"""Quantization configs, the scheme registry and ``quantize_model`` (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from ..errors import BlitzgenError

INT4_GROUP_SIZES = (32, 64, 128)
SCHEMES = ("int8", "int4")
# Suffixes of the Linear layers that are quantized (every Linear in model.Transformer).
TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2", "output")


@dataclass(frozen=True)
class Int8Config:
    """Per-output-channel symmetric int8 weights; scales in the compute dtype."""

    head: bool = True  # quantize the output head too (False: it keeps its float weights)
    scheme: ClassVar[str] = "int8"

    @property
    def group_size(self) -> None:
        return None


@dataclass(frozen=True)
class Int4Config:
    """Group-wise asymmetric 4-bit weights (tinygemm convention); scales/zeros in the compute dtype."""

    group_size: int = 32
    # quantize the output head too (False: it keeps its float weights; "int8": the head as int8,
    # loading.auto_quantization's choice for a 4-bit GGUF whose head is stored in 8 bits)
    head: bool | str = True
    # scale = the group's largest-magnitude weight / -8, zero 0: the grid of a GGUF's Q4_0 blocks,
    # which min/max would round a second time (set by loading.auto_quantization, never by a flag)
    symmetric: bool = False
    scheme: ClassVar[str] = "int4"

    def __post_init__(self) -> None:
        if self.head not in (True, False, "int8"):
            raise BlitzgenError(f"int4 head must be quantized, left float or int8, got {self.head!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                or self.group_size not in INT4_GROUP_SIZES:
            raise BlitzgenError(
                f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {self.group_size!r}"
            )


QuantConfig = Int8Config | Int4Config


def make_config(scheme: str, group_size: int | None = None, head: bool = True,
                symmetric: bool = False) -> QuantConfig:
    """The config for a scheme name ("int8" | "int4"); group_size applies to int4 only (default 32);
    ``head=False`` leaves the output head unquantized; ``symmetric``: int4's Q4_0 grid."""
    key = str(scheme).lower().strip()
    if key == "int8":
        if group_size is not None:
            raise BlitzgenError("int8 quantization is per output channel; --group-size applies to int4 only")
        return Int8Config(head=head is not False)  # "int8" names an int4 config's head: here the same
    if key == "int4":
        return Int4Config(group_size=32 if group_size is None else group_size, head=head, symmetric=symmetric)
    raise BlitzgenError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")


# ------------------------------------------------------------------------------------------------
# registry: one handler per config type, torchao quantize_(model, Config)-style


@dataclass(frozen=True)
class Handler:
    """How one scheme quantizes an nn.Linear and rebuilds an empty module for loading.

    check(name, linear, config): raise BlitzgenError if the layer cannot take this scheme.
    quantize(linear, config, dtype): the quantized module, ready to run (weights on the linear's
    device, device-specific caches built; scales, zeros and bias in dtype).
    empty(in_features, out_features, bias, config, dtype, device): an unfilled module of the
    same layout, for assigning a checkpoint's tensors.
    """

    module_type: type
    check: Callable[[str, nn.Linear, object], None]
    quantize: Callable[[nn.Linear, object, torch.dtype], nn.Module]
    empty: Callable[..., nn.Module]


_HANDLERS: dict[type, Handler] = {}


def register_handler(config_type: type, handler: Handler) -> None:
    _HANDLERS[config_type] = handler


def handler_for(config) -> Handler:
    _load_builtin_schemes()
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise BlitzgenError(f"no quantization handler for {type(config).__name__}") from None


def _load_builtin_schemes() -> None:
    from . import int4, int8  # noqa: F401  (they register themselves)


def quantized_module_types() -> tuple[type, ...]:
    _load_builtin_schemes()
    return tuple(h.module_type for h in _HANDLERS.values())


def is_quantized(model: nn.Module) -> bool:
    types = quantized_module_types()
    return any(isinstance(m, types) for m in model.modules())


def target_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every Linear that quantization replaces, in model order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (name in TARGETS or name.endswith(tuple("." + t for t in TARGETS)))]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def module_config(config, name: str):
    """(handler, config) that the target module ``name`` is quantized with: the config's own,
    except an int4 config's int8 head (``head="int8"``)."""
    if name == "output" and getattr(config, "head", True) == "int8":
        config = Int8Config()
    return handler_for(config), config


def config_meta(config) -> dict:
    h = getattr(config, "head", True)
    head = {} if h is True else {"head": h}
    sym = {"symmetric": True} if getattr(config, "symmetric", False) else {}
    return {"scheme": config.scheme, "group_size": config.group_size, **head, **sym}


def quant_metadata(config, dtype: torch.dtype, n_modules: int) -> dict:
    return {**config_meta(config), "dtype": str(dtype).replace("torch.", ""), "quantized_modules": n_modules}


def plan_quantization(model: nn.Module, config, dtype: torch.dtype) -> tuple[Handler, dict[str, bool]]:
    """Check every target Linear of ``model`` (its weights may still be on the meta device) against
    ``config`` before anything is loaded or quantized. Returns the handler and {module name: has
    bias} of the targets, for quantizing layer by layer as the weights arrive (``quantize_weight``)."""
    if isinstance(config, str):
        config = make_config(config)
    handler = handler_for(config)
    if not dtype.is_floating_point:
        raise BlitzgenError(f"scales must be a float dtype, not {dtype}")
    targets = [(name, lin) for name, lin in target_linears(model) if config.head or name != "output"]
    if not targets:
        raise BlitzgenError("the model has no Linear layers to quantize")
    for name, lin in targets:
        h, c = module_config(config, name)
        h.check(name, lin, c)
    return handler, {name: lin.bias is not None for name, lin in targets}


@torch.no_grad()
def quantize_weight(handler: Handler, config, weight: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> nn.Module:
    """The quantized module for one Linear's weight [out, in] (and bias), on the weight's device."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return handler.quantize(lin, config, dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, config, *, dtype: torch.dtype | None = None) -> dict:
    """Replace the model's Linear layers (wqkv, wo, w13, w2, output) in place by quantized modules.

    The token embedding stays as it is; a tied output head is quantized as its own copy. Every
    layer is checked before any is touched, so on error the model is unchanged. Scales, zeros and
    biases are in ``dtype`` (default: the weights' dtype, i.e. the compute dtype); the math is
    float32 either way, with values quantized against the scales as rounded to dtype. Returns
    metadata ({"scheme", "group_size", "dtype", "quantized_modules"}).

    This needs the whole float model in memory first; ``loading.load(..., quantize=...)`` and
    the benchmark's random-weight builder quantize each layer as it arrives instead.
    """
    if isinstance(config, str):
        config = make_config(config)
    if is_quantized(model):
        raise BlitzgenError("the model is already quantized")
    targets = target_linears(model)
    for name, lin in targets:
        if lin.weight.device.type == "meta":
            raise BlitzgenError(f"{name} has no weights (meta device); load the model before quantizing")
    dtype = dtype or (targets[0][1].weight.dtype if targets else torch.float32)
    handler, names = plan_quantization(model, config, dtype)
    del targets, lin  # hold no reference, so each float weight is freed as soon as it is replaced
    for name in names:
        h, c = module_config(config, name)
        set_submodule(model, name, h.quantize(model.get_submodule(name), c, dtype))
    return quant_metadata(config, dtype, len(names))


def prepare_model(model: nn.Module) -> nn.Module:
    """Build each quantized module's device-specific caches (packed formats, kernel hooks)."""
    for m in model.modules():
        prep = getattr(m, "prepare", None)
        if prep is not None and isinstance(m, quantized_module_types()):
            prep()
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace quantized modules by plain nn.Linear layers holding their dequantized weights, in
    the scales' dtype (the float "twin" that tests compare against)."""
    types = quantized_module_types()
    for name, m in list(model.named_modules()):
        if isinstance(m, types):
            set_submodule(model, name, m.to_linear())
    return model


# ------------------------------------------------------------------------------------------------
# what the quantized linears share


class QuantizedLinear(nn.Module):
    """Base of Int8Linear and Int4Linear: shape, an optional bias (in the scales' dtype), the
    persistent storage buffers (``STORAGE``, what checkpoints hold), device caches rebuilt by
    ``prepare()`` after every move, the output cast to the activations' dtype, and the float twin."""

    STORAGE: ClassVar[tuple[str, ...]] = ()  # persistent buffers besides the bias, main one first

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def storage(self) -> torch.Tensor:
        return getattr(self, self.STORAGE[0])

    def prepare(self) -> None:
        """(Re)build device-specific caches (packed copies, kernel hooks); nothing by default."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # a device or dtype move: rebuild the caches
        if self.storage().device.type != "meta":
            self.prepare()
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def split_unit(self) -> int:
        """Inputs that must stay together when the inputs are split (int4: a group)."""
        return 1

    @torch.no_grad()
    def shard(self, dim: int, rank: int, world: int, ranges: list[tuple[int, int]] | None = None
              ) -> "QuantizedLinear":
        """Keep only this rank's part, in place (tensor parallelism), and rebuild the caches.

        dim 0 splits the outputs: the rows in ``ranges`` (default: the rank's equal share) of every
        stored tensor, scales and bias included. dim 1 splits the inputs into equal shares of
        whole ``split_unit()`` inputs: every 2-D stored tensor gives its columns (packed or
        grouped), 1-D ones (per-channel scales, bias) stay whole."""
        from ..parallel.tp import ShardError, shard_tensor

        if dim == 1 and self.in_features % (world * self.split_unit()):
            raise ShardError(f"cannot split the {self.in_features} inputs of this {self.describe()} layer "
                             f"{world} ways in whole groups of {self.split_unit()}")
        names = [n for n in (*self.STORAGE, "bias") if getattr(self, n) is not None]
        for n in names:
            setattr(self, n, shard_tensor(getattr(self, n), dim, rank, world, ranges).contiguous())
        rows = self.storage().shape[0]
        if dim == 0:
            self.out_features = rows
        else:
            self.in_features //= world
        if self.storage().device.type != "meta":
            self.prepare()
        return self

    def _copy_bias(self, lin: nn.Linear, dtype: torch.dtype) -> None:
        if lin.bias is not None:
            self.bias = lin.bias.detach().to(dtype=dtype, copy=True)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Add the bias; return in x's dtype (scales and bias may be stored in another dtype:
        quantize's --dtype, load(quant_dtype=))."""
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (in the scales' dtype)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    def describe(self) -> str:
        return ""

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.describe()}")


# ------------------------------------------------------------------------------------------------
# hook for custom GPU kernels (blitzgen.kernels.int4_gemv / int8_gemv), looked up when a module
# is prepared, never inside forward (so torch.compile sees a plain attribute)


def get_kernel(name: str) -> Callable | None:
    """``blitzgen.kernels.<name>`` (e.g. "int8_gemv") when the Triton kernels can run here, else
    None. A None is reported once per kernel with its reason (``runtime.fallback``): disabled by
    BLITZGEN_KERNELS=0, no CUDA, or Triton's import error. Callers ask only for CUDA modules."""
    from .. import runtime

    what = f"quantized decode ({name})"
    try:
        from .. import kernels
    except Exception as e:  # a broken install: reported, never swallowed
        runtime.fallback(what, f"blitzgen.kernels failed to import ({type(e).__name__}: {e})")
        return None
    fn = getattr(kernels, name, None)
    if not callable(fn):
        raise ValueError(f"blitzgen.kernels has no kernel named {name!r}")
    return fn if kernels.report_unavailable(what) else None


def is_single_token(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1]


def scale_eps(dtype: torch.dtype) -> float:
    """Smallest scale kept (so a zero row/group never divides by zero once cast to dtype)."""
    return max(torch.finfo(dtype).tiny, 1e-10) if dtype.is_floating_point else 1e-10
