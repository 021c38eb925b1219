"""Speed: the speed profiles (`DREAMOMNI2_SPEED`) and the step caches, chosen per job.

Speed profiles, set per deployment:

- `reference`: the eager path, as the reference runs it; every ratio is measured against it.
- `compiled`: close to `reference`, not bit-identical. Both LoRAs are applied by rewriting the weights
  they adapt (`FusedAdapters`: from a pristine copy on every switch, so switching never drifts),
  which lets the q/k/v projections fuse (`fuse_qkv_projections`) with the LoRA intact and costs
  nothing per step; the repeated blocks are compiled (`torch.compile`, dynamic sequence length, one
  graph per block kind, the cache hooks outside the compiled code); attention runs on the fastest
  backend the machine has. Numerically: the folded weights round `W0 + s B A` to bf16 once per
  element, the fused q/k/v and the compiled kernels sum in other orders; as far from an fp64
  reference as `reference` itself, but other numbers (`bench/precision_bench.py`,
  `bench/speed_bench.py` measure how far).
- `fp8`: `compiled`, plus torchao's dynamic fp8 quantization (rowwise) of the transformer's linears
  that no LoRA adapts (the MLPs: most of the FLOPs); on GPUs with fp8 (compute capability 8.9+) only.

Step caches: a job's `step_cache` (`api_schemas.common.StepCache`) turns one of diffusers' caches on for that
job's pipeline call and off after it, so jobs with and without a cache share one worker:

- `first_block`: First Block Cache. Each step runs the first block; when its residual changed by less
  than `DREAMOMNI2_FIRST_BLOCK_THRESHOLD` (relative) since the last full pass, the other blocks are
  skipped and their cached residual reused. Adaptive: how many steps it saves depends on the image.
- `taylorseer`: TaylorSeer in its lite form, a fixed schedule. The first `TAYLORSEER_WARMUP_STEPS`
  steps run in full, then one step in `DREAMOMNI2_TAYLORSEER_INTERVAL`; in between, the blocks are
  skipped and the output projection is predicted from a first-order Taylor expansion.

Both need every transformer call inside `transformer.cache_context(...)`, which the pipeline provides.
`EvaluationCounter` counts the passes in which the last block really ran: a job's
`transformer_evaluations`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch._inductor.utils
import torch.fx.experimental._config
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, ModelHook, TaylorSeerCacheConfig

from api_schemas.common import AdapterChoice, StepCache
from api_schemas.loras import AppliedLora
from models.failures import summary
from models.pinned import HostBlocks
from models.profiles import SpeedProfile

if TYPE_CHECKING:
    from models.adapters import AdapterSet
    from models.pipeline import DreamOmni2Pipeline
    from models.user_loras import UserLoras

logger = logging.getLogger(__name__)

#: Full steps TaylorSeer runs before it starts predicting (its factors need them).
TAYLORSEER_WARMUP_STEPS = 3
_COUNTER_HOOK = "dreamomni2_evaluations"


class EvaluationCounter(ModelHook):
    """Counts the calls of the block it is on that really run it (not skipped by a cache hook).

    Registered before any cache, it sits inside them: a cache that skips the block never calls it.
    """

    _is_stateful = False

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        self.count += 1
        return self.fn_ref.original_forward(*args, **kwargs)


def install_counter(transformer: torch.nn.Module) -> EvaluationCounter:
    """Count full passes of `transformer` (a FLUX transformer) at its last block."""
    blocks = transformer.single_transformer_blocks or transformer.transformer_blocks
    counter = EvaluationCounter()
    HookRegistry.check_if_exists_or_initialize(blocks[-1]).register_hook(counter, _COUNTER_HOOK)
    return counter


def step_cache_config(
    policy: StepCache, *, first_block_threshold: float, taylorseer_interval: int, dtype: torch.dtype
) -> FirstBlockCacheConfig | TaylorSeerCacheConfig | None:
    """diffusers' configuration of a step-cache policy (None for `none`)."""
    if policy is StepCache.FIRST_BLOCK:
        return FirstBlockCacheConfig(threshold=first_block_threshold)
    if policy is StepCache.TAYLORSEER:
        return TaylorSeerCacheConfig(
            cache_interval=taylorseer_interval,
            disable_cache_before_step=TAYLORSEER_WARMUP_STEPS,
            use_lite_mode=True,
            taylor_factors_dtype=dtype,
        )
    return None


@contextlib.contextmanager
def step_cache(
    transformer: torch.nn.Module, config: FirstBlockCacheConfig | TaylorSeerCacheConfig | None
) -> Iterator[None]:
    """The cache `config` enabled on `transformer` for the duration (nothing for None)."""
    if config is None:
        yield
        return
    transformer.enable_cache(config)
    try:
        yield
    finally:
        transformer.disable_cache()


# Speed profiles ---------------------------------------------------------------------------------------
class SpeedProfileError(RuntimeError):
    """The configured speed profile cannot run on this worker; the message says what would."""


#: The attention backends tried on a CUDA GPU, fastest first (diffusers' dispatcher names): FA3 where
#: `flash_attn_interface` is installed, then cuDNN's SDPA, then PyTorch's flash and efficient SDPA.
CUDA_ATTENTION_BACKENDS = ("_flash_3", "_native_cudnn", "_native_flash", "_native_efficient")
#: Tokens of the backend probe's long call: a 2-image job at 1 MP (512 text + 3 x 4096 image tokens).
PROBE_TOKENS = 512 + 3 * 4096


def attention_backend(
    device: torch.device, heads: int = 24, head_dim: int = 128, tokens: int = PROBE_TOKENS
) -> str:
    """The fastest attention backend `device` runs correctly at the model's shapes (diffusers' name).

    Each candidate must take the real head count and size at a long sequence (`tokens`) and give
    finite output, and agree with PyTorch's math attention on a short one: a backend that rejects
    the shape, or silently computes something else, is passed over.
    """
    if device.type != "cuda":
        return "native"
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    generator = torch.Generator(device=device).manual_seed(0)

    def qkv(length: int) -> torch.Tensor:
        return torch.randn(
            1, length, heads, head_dim, device=device, dtype=torch.bfloat16, generator=generator
        )

    short = qkv(256)
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(short.transpose(1, 2).float(),) * 3
    ).transpose(1, 2)
    long = qkv(tokens)
    for name in CUDA_ATTENTION_BACKENDS:
        try:
            out = dispatch_attention_fn(long, long, long, backend=name)
            finite = bool(torch.isfinite(out).all())
            error = (dispatch_attention_fn(short, short, short, backend=name).float() - expected).abs().max()
        except Exception as exc:  # not installed, or not for this GPU or these shapes
            logger.info("attention backend %s unavailable: %s", name, exc)
            continue
        if finite and float(error) < 0.05:
            return name
        logger.warning("attention backend %s gives wrong results here (max error %.3g); skipped", name, error)
    return "native"


def compile_preflight(device: torch.device) -> str | None:
    """Whether this machine can compile for `device`: None if a small `torch.compile` builds and runs,
    else what failed (on a GPU: Triton needs a C compiler and the Python headers at run time; on a
    CPU: Inductor needs a C++ compiler). It compiles for real every time: a fresh function (Dynamo
    caches compiled frames by code object) in fresh temporary Inductor and Triton caches, so neither an
    earlier compile in this process nor a persistent cache can stand in for the toolchain."""

    def probe(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x) * 2 + 1

    fresh = types.FunctionType(
        probe.__code__.replace(co_name=f"compile_preflight_{next(_preflights)}"), probe.__globals__
    )
    try:
        with torch._inductor.utils.fresh_cache():
            compiled = torch.compile(fresh, fullgraph=True)
            x = torch.arange(64, dtype=torch.float32, device=device)
            if not torch.allclose(compiled(x), probe(x)):
                return "a compiled test function gave wrong results"
    except Exception as exc:  # the toolchain's error, reported as the reason
        return summary(exc)
    return None


_preflights = itertools.count(1)


def fp8_supported(device: torch.device) -> bool:
    """Whether `device` has fp8 matrix units (CUDA compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass
class _Target:
    """One Linear the LoRAs adapt: its pristine weight and each adapter's low-rank updates."""

    module: torch.nn.Linear
    pristine: torch.Tensor
    updates: dict[AdapterChoice, list[tuple[slice, torch.Tensor, torch.Tensor, float]]] = field(
        default_factory=dict
    )


#: Where a LoRA on an unfused projection lands once q/k/v are fused: (fused name, position).
_FUSED_SLOTS = {
    "to_q": ("to_qkv", 0),
    "to_k": ("to_qkv", 1),
    "to_v": ("to_qkv", 2),
    "add_q_proj": ("to_added_qkv", 0),
    "add_k_proj": ("to_added_qkv", 1),
    "add_v_proj": ("to_added_qkv", 2),
}


class FusedAdapters:
    """Both LoRAs applied by rewriting the weights they adapt; the same interface as `AdapterSet`.

    A switch rewrites every adapted weight from its pristine copy: `W = W0 + scale * B @ A` (nothing for
    base), always from `W0`, so a hundred switches leave each adapter's weights bit-identical to its
    first; values change in place, so compiled code is never invalidated. The sum is rounded to the
    weights' dtype once per element (in bf16 a share of each LoRA's smallest changes is rounded away:
    `bench/precision_bench.py` measures it), so a fused adapter is close to peft's unfused side path,
    not bit-identical to it. The pristine copies stay on the device where the caller's budget allows
    (a switch is then a device-to-device copy), else in host memory (packed in pinned blocks next to
    a GPU: `models.pinned`).
    """

    def __init__(
        self,
        targets: list[_Target],
        user: UserLoras | None = None,
        slots: dict[str, tuple[_Target, slice]] | None = None,
    ):
        self.targets = targets
        #: The operator's registered LoRAs, folded in per job; `slots`: where each module they adapt
        #: (unfused name) lands: its target and rows (q, k and v are fused).
        self.user = user
        self.slots = slots or {}
        self.active: AdapterChoice | None = None
        self._loras: tuple[AppliedLora, ...] = ()
        #: The targets the current job's registered LoRAs rewrote.
        self._touched: set[int] = set()
        #: Where the pristine copies are: the weights' device, or "cpu" (host blocks).
        self.pristine_device = str(targets[0].pristine.device) if targets else "cpu"
        self.host: HostBlocks | None = None
        self.activate(AdapterChoice.BASE)

    @property
    def pristine_bytes(self) -> int:
        return sum(t.pristine.numel() * t.pristine.element_size() for t in self.targets)

    @classmethod
    def from_peft(
        cls,
        pipeline: DreamOmni2Pipeline,
        names: dict[AdapterChoice, str],
        device_budget_bytes: int = 0,
        user: UserLoras | None = None,
    ) -> FusedAdapters:
        """Take the LoRAs `pipeline` loaded (peft), remove peft, fuse q/k/v, and keep the updates.

        The pristine copies of the adapted weights stay on the weights' device if they fit in
        `device_budget_bytes`, else go to host memory. `user`: the registered LoRAs; every weight one
        of them adapts gets a pristine copy too, so a job's LoRAs fold in and out without drift.
        """
        from peft.tuners.lora.layer import LoraLayer

        transformer = pipeline.transformer
        loras: dict[str, dict[AdapterChoice, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for name, module in transformer.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            for choice, adapter in names.items():
                if adapter not in module.lora_A:
                    continue
                if module.use_dora.get(adapter):
                    raise SpeedProfileError(
                        f"{name}: DoRA adapters cannot be fused; use DREAMOMNI2_SPEED=reference"
                    )
                a = module.lora_A[adapter].weight.detach().clone()
                b = module.lora_B[adapter].weight.detach().clone()
                loras.setdefault(name, {})[choice] = (a, b, float(module.scaling[adapter]))
        pipeline.unload_lora_weights()
        transformer.fuse_qkv_projections()
        _drop_unfused_projections(transformer)

        user_targets = sorted(user.targets) if user is not None else []
        # Each adapted module (unfused name) -> the Linear it lands in, and its place in a fused q/k/v.
        modules: dict[str, torch.nn.Linear] = {}
        placement: dict[str, tuple[str, int | None]] = {}
        for name in dict.fromkeys([*loras, *user_targets]):
            parent, _, leaf = name.rpartition(".")
            fused_leaf, position = _FUSED_SLOTS.get(leaf, (leaf, None))
            target_name = f"{parent}.{fused_leaf}" if parent else fused_leaf
            modules.setdefault(target_name, transformer.get_submodule(target_name))
            placement[name] = (target_name, position)
        weights = [module.weight for module in modules.values()]
        on_device = sum(w.numel() * w.element_size() for w in weights) <= device_budget_bytes
        host = None
        if on_device:
            pristines = [w.detach().clone() for w in weights]
        else:
            host = HostBlocks([w.detach() for w in weights], pin=weights[0].device.type == "cuda")
            pristines = host.views
        targets = {
            target_name: _Target(module, pristine)
            for (target_name, module), pristine in zip(modules.items(), pristines, strict=True)
        }

        def slot(name: str) -> tuple[_Target, slice]:
            """The target of module `name` and its rows there (a third of a fused q/k/v)."""
            target_name, position = placement[name]
            target = targets[target_name]
            rows = target.module.weight.shape[0] // (1 if position is None else 3)
            start = 0 if position is None else position * rows
            return target, slice(start, start + rows)

        for name, updates in loras.items():
            target, rows = slot(name)
            for choice, (a, b, scale) in updates.items():
                target.updates.setdefault(choice, []).append((rows, a, b, scale))
        fused = cls(list(targets.values()), user, {name: slot(name) for name in user_targets})
        fused.host = host
        return fused

    @torch.no_grad()
    def activate(self, choice: AdapterChoice, loras: Sequence[AppliedLora] = ()) -> None:
        """Make `choice` the adapter in effect (`BASE`: the pristine weights) with the registered
        `loras` folded on top, in order. Every weight the previous or this job's LoRAs touch, and
        every DreamOmni2-adapted one, is rewritten from its pristine copy."""
        loras = tuple(loras)
        if choice is self.active and loras == self._loras:
            return
        chosen = self.user.weights(loras) if self.user is not None and loras else []
        folds: dict[int, list[tuple[slice, torch.Tensor, torch.Tensor, float]]] = {}
        for weights, scale in chosen:
            for module, update in weights.updates.items():
                target, rows = self.slots[module]
                folds.setdefault(id(target), []).append((rows, update.down, update.up, update.scale * scale))
        # Unknown until rewritten: a failure half way (out of memory) leaves the next call a full rewrite.
        self.active, self._loras = None, ()
        touched, self._touched = self._touched | set(folds), set()
        for target in self.targets:
            if not target.updates and id(target) not in touched:
                continue  # adapted by registered LoRAs only, and pristine now
            weight = target.module.weight
            weight.copy_(target.pristine, non_blocking=True)
            for rows, a, b, scale in target.updates.get(choice, ()):
                weight[rows].addmm_(b, a, alpha=scale)
            for rows, down, up, scale in folds.get(id(target), ()):
                # Moved to the device for this job only; folded once, in the weights' dtype.
                up, down = up.to(weight.device, non_blocking=True), down.to(weight.device, non_blocking=True)
                weight[rows].addmm_(up, down, alpha=scale)
        self.active, self._loras, self._touched = choice, loras, set(folds)


def _drop_unfused_projections(transformer: torch.nn.Module) -> None:
    # Once fused, the attention uses to_qkv / to_added_qkv only; the separate projections would
    # hold a second copy of those weights (about 3 GB in the full model).
    for module in transformer.modules():
        if getattr(module, "fused_projections", False):
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                if getattr(module, name, None) is not None:
                    delattr(module, name)


def compile_blocks(transformer: torch.nn.Module) -> None:
    """Compile each repeated block's own forward (shared code: one graph per block kind).

    The block's forward itself is compiled, not its module call, so hooks registered afterwards
    (step caches, the evaluation counter) wrap the compiled code and run eagerly around it. Dynamic
    shapes: a new image count or bucket changes the sequence length, not the graph.
    """
    # Duck shaping gives sizes that are equal at the first call one symbol: a sequence length that
    # happens to equal a model width (the tiny preset's 32, or 3072 tokens on the real model) would be
    # specialized to it by the width's guard and compiled twice. Off, every shape is compiled once.
    torch.fx.experimental._config.use_duck_shape = False
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=True)


def quantize_fp8(transformer: torch.nn.Module, skip: set[torch.nn.Module]) -> int:
    """torchao's dynamic fp8 (rowwise) on the blocks' linears, except `skip`; the number quantized."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    chosen: list[str] = []

    def wanted(module: torch.nn.Module, name: str) -> bool:
        ok = isinstance(module, torch.nn.Linear) and module not in skip and "blocks." in name
        if ok:
            chosen.append(name)
        return ok

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=wanted)
    return len(chosen)


@dataclass
class ProfileReport:
    """What applying a profile did, for the worker's readiness info."""

    profile: SpeedProfile
    attention_backend: str = "native"
    fused_targets: int = 0
    fp8_linears: int = 0
    notes: list[str] = field(default_factory=list)
    #: What the worker runs instead of the profile when it could not apply it (`reference`: nothing
    #: was applied; `eager`: applied, but the blocks run uncompiled), and why.
    fallback: str | None = None
    error: str | None = None

    @property
    def compiled(self) -> bool:
        """Whether blocks were compiled (a warm-up then compiles them)."""
        return self.profile is not SpeedProfile.REFERENCE and self.fallback != "reference"

    def fall_back(self, to: str, error: str) -> None:
        self.fallback, self.error = to, error

    @property
    def serving(self) -> str:
        """What jobs run with: the profile, `reference` when it could not be applied at all, or
        `<profile>-eager` when its blocks run uncompiled."""
        if self.fallback == "reference":
            return SpeedProfile.REFERENCE.value
        if self.fallback == "eager":
            return f"{self.profile.value}-eager"
        return self.profile.value


def require_supported(profile: SpeedProfile, device: torch.device) -> None:
    """Raise `SpeedProfileError` when `profile` asks for what `device` lacks (fp8 matrix units)."""
    if profile is SpeedProfile.FP8 and not fp8_supported(device):
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        raise SpeedProfileError(
            f"DREAMOMNI2_SPEED=fp8 needs a GPU with fp8 matrix units (compute capability 8.9 or newer: "
            f"L4, L40S, RTX 4090, H100, H200); this worker runs on {where}. Use DREAMOMNI2_SPEED=compiled."
        )


def apply_profile(
    profile: SpeedProfile,
    pipeline: DreamOmni2Pipeline,
    adapters: AdapterSet,
    device: torch.device,
    device_budget_bytes: int = 0,
) -> tuple[AdapterSet | FusedAdapters, ProfileReport]:
    """Make `pipeline` (placed, LoRAs loaded as `adapters`) run as `profile`; returns its adapters.

    `reference` changes nothing. The others fuse the adapters, fuse q/k/v, choose the attention
    backend and compile the blocks (fp8 quantizes the unadapted linears first). Raises
    `SpeedProfileError` when `fp8` asks for what this device lacks.
    """
    report = ProfileReport(profile)
    if profile is SpeedProfile.REFERENCE:
        return adapters, report
    require_supported(profile, device)
    transformer = pipeline.transformer
    fused = FusedAdapters.from_peft(pipeline, adapters.names, device_budget_bytes, user=adapters.user)
    report.fused_targets = len(fused.targets)
    if profile is SpeedProfile.FP8:
        report.fp8_linears = quantize_fp8(transformer, skip={t.module for t in fused.targets})
    config = transformer.config
    report.attention_backend = attention_backend(
        device, config.num_attention_heads, config.attention_head_dim
    )
    transformer.set_attention_backend(report.attention_backend)
    compile_blocks(transformer)
    return fused, report
