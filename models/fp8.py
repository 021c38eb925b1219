"""fp8 weight storage with per-row scales: the `low` memory mode's transformer, in torch alone.

A plain cast to float8_e4m3fn (what diffusers' layerwise casting does) has no scale. e4m3's normal
range starts at 2^-6 (0.016): at FLUX's weight scale (std 0.01-0.02) most weights land among the
subnormals, which carry fewer mantissa bits, and 4-8 % flush to zero; a layer's output is then
3.3-5.7 % off its bf16 output, more for smaller weights. Here each output row of a Linear's weight is
stored as fp8 codes `q` and one fp32 scale `s = amax(|row|) / 448` (448 is e4m3's largest finite
value), so the row fills e4m3's range and `W ~ q * s`: almost nothing flushes (under 1e-5 of the
weights) and the error no longer depends on the weight's scale. What remains, about 2.7 % per layer,
is e4m3's 3-bit mantissa, which no scale removes (`bench/precision_bench.py` measures both).

- stored: the fp8 codes (1 byte a weight), the scales (4 bytes a row) and the bias in the compute
  dtype; nothing else, and no persistent compute-dtype copy;
- computed: each forward dequantizes the weight into a temporary in the compute dtype (one rounding
  of the fp32 product `q * s`), multiplies, and drops it when it returns.

`store_in_fp8` picks the same Linears diffusers' `enable_layerwise_casting` picks with its defaults
(norms, embeddings, the top-level `proj_in` / `proj_out` and peft's adapter layers are left as they
are; a peft-wrapped projection's `base_layer` is stored). It works on the meta device, so the memory
planner sizes the stored model exactly with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

#: e4m3fn's largest finite value: a row's largest magnitude is mapped onto it.
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
FP8_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = torch.float32


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D weight as fp8 codes and one fp32 scale per output row: `weight ~ codes * scale`.

    The scale is `amax(|row|) / 448` (shape `(rows, 1)`); an all-zero row gets scale 0 and zero codes.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_rows takes a 2-D weight, got shape {tuple(weight.shape)}")
    with torch.no_grad():
        wide = weight.detach().to(SCALE_DTYPE)
        scale = wide.abs().amax(dim=1, keepdim=True) / FP8_MAX
        # A zero row divides by the smallest normal instead of 0: its codes stay 0, its scale 0.
        scaled = wide / scale.clamp_min(torch.finfo(SCALE_DTYPE).tiny)
        del wide
        # amax / (amax / 448) can round to just above 448, which e4m3fn would turn into NaN.
        codes = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`codes * scale` in `dtype`: a new tensor the size of the weight in `dtype`.

    fp8 to bf16/fp16/fp32 is exact, and the in-place product runs in fp32 and is rounded once to
    `dtype` (on a GPU inside the kernel; the CPU's kernel stages an fp32 temporary of its own).
    """
    return codes.to(dtype).mul_(scale)


class Fp8Linear(torch.nn.Linear):
    """A Linear whose weight is stored as fp8 codes with per-row fp32 scales; computes in `compute_dtype`.

    `weight` (fp8) and `bias` (compute dtype) are parameters, `weight_scale` a buffer, so whatever moves
    a module's parameters and buffers (`.to(device)`, a host swap of `.data`, group offloading) moves
    them all; `forward` reads them from the module at every call and keeps nothing.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ):
        # Not `Linear.__init__`: it would allocate (and initialize) a full-precision weight first.
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = codes.shape
        self.compute_dtype = compute_dtype
        self.weight = torch.nn.Parameter(codes, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = torch.nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype) -> Fp8Linear:
        """`linear`'s weight quantized per row, its bias in `compute_dtype`, on `linear`'s device."""
        codes, scale = quantize_rows(linear.weight)
        return cls(codes, scale, linear.bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self.weight, self.weight_scale, self.compute_dtype)
        return F.linear(x, weight, self.bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Fp8Linear:
        # `.to(torch.bfloat16)` or `.half()` on the model would otherwise turn the fp8 codes into plain
        # numbers (without their scale) and round the scales: device moves apply, dtype changes do not.
        # `.data` aliases the stored tensors themselves, which the conversion replaces in the module.
        names = ("weight", "weight_scale", "bias")
        kept = {name: t.data for name in names if (t := getattr(self, name)) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            now = getattr(self, name)
            if now.dtype != before.dtype:
                now.data = before.to(now.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, storage=float8_e4m3fn per-row scaled, "
            f"compute_dtype={self.compute_dtype}"
        )


def skip_patterns(model: torch.nn.Module) -> tuple[str, ...]:
    """The module-name patterns diffusers' `enable_layerwise_casting` skips on `model` by default."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = list(DEFAULT_SKIP_MODULES_PATTERN)
    patterns += getattr(model, "_keep_in_fp32_modules", None) or []
    patterns += getattr(model, "_skip_layerwise_casting_patterns", None) or []
    try:
        from peft.tuners.loha.layer import LoHaLayer
        from peft.tuners.lokr.layer import LoKrLayer
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # no peft: no adapter layers to keep
        pass
    else:
        for layer in (LoHaLayer, LoKrLayer, LoraLayer):
            patterns += layer.adapter_layer_names
    return tuple(dict.fromkeys(patterns))


def linears_to_store(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The Linears `store_in_fp8` would store, by qualified name (those already stored excluded).

    A module whose name matches a skip pattern is skipped with everything under it, as diffusers does
    (so `norm1.linear` stays, and so do `lora_A.<adapter>` and `lora_B.<adapter>`).
    """
    patterns = skip_patterns(model)
    chosen: list[tuple[str, torch.nn.Linear]] = []

    def visit(module: torch.nn.Module, prefix: str) -> None:
        if prefix and any(re.search(pattern, prefix) for pattern in patterns):
            return
        if isinstance(module, torch.nn.Linear):
            if not isinstance(module, Fp8Linear):
                chosen.append((prefix, module))
            return
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    return chosen


def store_in_fp8(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Store the transformer's Linears in fp8 with per-row scales, computing in `compute_dtype`.

    In place: each chosen Linear (see `linears_to_store`) is replaced in its parent by an `Fp8Linear`
    on the same device; everything else is left as it is. Call it after the LoRAs are loaded (their
    layers stay in the compute dtype, the base layers they wrap are stored) and before any hook,
    offloading or compilation is set up on the layers. Works on the meta device. Returns the number
    of layers stored; a second call stores none.
    """
    chosen = linears_to_store(transformer)
    for name, linear in chosen:
        if linear._forward_hooks or linear._forward_pre_hooks or hasattr(linear, "_diffusers_hook"):
            raise ValueError(f"{name} has hooks already; store the transformer in fp8 before adding any")
    stored = len(chosen)
    while chosen:
        # Popped, so that each full-precision weight is freed as soon as its codes exist: the model
        # never holds both forms of more than one layer.
        name, linear = chosen.pop()
        parent_name, _, leaf = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, leaf, Fp8Linear.from_linear(linear, compute_dtype))
        del linear
    return stored


def is_fp8(module: torch.nn.Module) -> bool:
    """Whether `module` is a layer stored in fp8 by `store_in_fp8`."""
    return isinstance(module, Fp8Linear)


def fp8_layers(module: torch.nn.Module) -> Iterator[tuple[str, Fp8Linear]]:
    """Every fp8-stored layer under `module` (itself included), by qualified name."""
    for name, child in module.named_modules():
        if isinstance(child, Fp8Linear):
            yield name, child


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers as stored (fp8 codes, fp32 scales, the rest as is)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def largest_dequantized_bytes(module: torch.nn.Module) -> int:
    """The largest temporary weight one fp8 layer's forward makes (its weight in its compute dtype)."""
    sizes = [layer.weight.numel() * layer.compute_dtype.itemsize for _, layer in fp8_layers(module)]
    return max(sizes, default=0)


def compute_dtype_of(module: torch.nn.Module) -> torch.dtype | None:
    """The compute dtype of `module`'s fp8 layers; None when it has none.

    diffusers' `ModelMixin.dtype` reports the first floating parameter, which after `store_in_fp8` is
    an fp8 weight: ask this instead where the dtype to compute in is meant.
    """
    return next((layer.compute_dtype for _, layer in fp8_layers(module)), None)
