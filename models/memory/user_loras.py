"""What the operator's registered LoRAs (`DREAMOMNI2_LORAS`) add to a plan, read off their files.

Three things, each where the worker keeps it (`models.user_loras`, `models.speed.FusedAdapters`):

- on the pipeline's device, for the whole job: the `DREAMOMNI2_MAX_LORAS_PER_JOB` largest LoRAs, the
  most one job moves there;
- in host memory: the bounded LRU cache (`DREAMOMNI2_LORA_CACHE_BYTES`). It may run over its bound by
  the LoRAs of the running job (one just asked for always stays, and a job holds the ones it stacks
  while the cache drops them), so it is counted as the bound plus the largest combination, and never
  more than every registered LoRA;
- under a compiled profile, the pristine copies of the weights only registered LoRAs adapt (the
  DreamOmni2 LoRAs' ones are counted with `ArchitectureSizes.adapted_weight_bytes`): the fold
  rewrites them from these on every switch, q/k/v fused into one weight as the profile fuses them.

Sizes are those of the converted LoRAs (diffusers' converters split kohya's fused q/k/v, which
repeats their down projections): the converters run on tensors of the meta device, so nothing but
the scalars (alphas) is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from models.user_loras import LoraFileError, resolve_lora_file

if TYPE_CHECKING:
    from models.settings import EngineSettings

#: The unfused projections a compiled profile fuses, by leaf name: (fused leaf, how many it joins).
_FUSED = {
    **{leaf: ("to_qkv", 3) for leaf in ("to_q", "to_k", "to_v")},
    **{leaf: ("to_added_qkv", 3) for leaf in ("add_q_proj", "add_k_proj", "add_v_proj")},
}


@dataclass(frozen=True)
class UserLoraSizes:
    """The registered LoRAs in a plan (bytes in the worker's dtype)."""

    #: The largest combination one job may stack, on the pipeline's device during the job.
    device_bytes: int
    #: The host-side cache at its fullest.
    cache_bytes: int
    #: Each weight only registered LoRAs adapt (fused as a compiled profile fuses it): a compiled
    #: profile keeps a pristine copy of each.
    lora_only_weight_bytes: tuple[int, ...]


def converted_shapes(name: str, file: Path) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(lora_A shape, lora_B shape) per transformer module (unfused diffusers name) of one LoRA file,
    converted as the worker converts it, without reading its weights."""
    from diffusers import FluxKontextPipeline

    try:
        with safe_open(str(file), framework="pt") as handle:
            state = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                shape = piece.get_shape()
                # Scalars (alphas) are read: the converters compute with them.
                state[key] = handle.get_tensor(key) if math.prod(shape) <= 1 else _meta(shape, piece)
        converted = FluxKontextPipeline.lora_state_dict(state)
    except (SafetensorError, OSError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
        raise LoraFileError(f"LoRA {name!r}: {file} cannot be sized ({exc}).") from None
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in converted.items():
        stem, _, part = key.removeprefix("transformer.").removesuffix(".weight").rpartition(".lora_")
        shapes.setdefault(stem, {})[part] = tuple(tensor.shape)
    return {module: (parts["A"], parts["B"]) for module, parts in shapes.items() if {"A", "B"} <= set(parts)}


def _meta(shape: list[int], piece: object) -> torch.Tensor:
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}.get(
        piece.get_dtype(),  # type: ignore[attr-defined]
        torch.float32,
    )
    return torch.empty(shape, dtype=dtype, device="meta")


def registered_lora_sizes(
    settings: EngineSettings, dtype: torch.dtype, dreamomni2_targets: tuple[str, ...] = ()
) -> UserLoraSizes | None:
    """The registered LoRAs of `settings` sized for a plan in `dtype` (None: none registered).
    `dreamomni2_targets`: the module name endings the DreamOmni2 LoRAs adapt (their pristine copies
    are counted already)."""
    limits = settings.limits
    if not limits.loras:
        return None
    per_lora: list[int] = []
    only: dict[str, int] = {}
    for name, entry in limits.loras.items():
        shapes = converted_shapes(name, resolve_lora_file(name, entry))
        per_lora.append(sum(math.prod(a) + math.prod(b) for a, b in shapes.values()) * dtype.itemsize)
        for module, (down, up) in shapes.items():
            if any(module == t or module.endswith("." + t) for t in dreamomni2_targets):
                continue
            parent, _, leaf = module.rpartition(".")
            fused, joined = _FUSED.get(leaf, (leaf, 1))
            only[f"{parent}.{fused}"] = joined * down[1] * up[0] * dtype.itemsize
    largest = sum(sorted(per_lora, reverse=True)[: limits.max_loras_per_job])
    return UserLoraSizes(
        device_bytes=largest,
        cache_bytes=min(sum(per_lora), settings.lora_cache_bytes + largest),
        lora_only_weight_bytes=tuple(only.values()),
    )
