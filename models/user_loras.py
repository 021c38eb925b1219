"""Operator-registered LoRAs (`DREAMOMNI2_LORAS`): read and checked at start, cached, applied per job.

Every registered file is read once when the worker starts: a file that is not safetensors, that
diffusers cannot convert (a LoRA for another base model), whose layers or shapes do not match this
transformer, whose rank is over `DREAMOMNI2_MAX_LORA_RANK`, or that also adapts a text encoder, stops
the start with the file named (`LoraFileError`); a worker never serves a half-loaded registry. The
formats are whatever diffusers' FLUX loader converts (`FluxLoraLoaderMixin.lora_state_dict`): peft /
diffusers keys, kohya's sd-scripts and ComfyUI layouts (the fused q/k/v split back), fal's Kontext
trainer. Pickled files are never opened: only `.safetensors`, read by `safetensors` itself.

Loaded LoRAs wait in host memory in a bounded LRU cache (`DREAMOMNI2_LORA_CACHE_BYTES`); one dropped
is read again on demand. A job's LoRAs go to the device for that job and stack on the adapter the
method's rule picks, in the order asked, in one of two ways:

- `SidePath` (the `reference` profile): beside each adapted layer, as peft runs an unfused LoRA:
  `y = layer(x) + sum(scale * B(A x))`. Nothing of a LoRA is left once the next job sets its own.
- folded into the weights (the compiled profiles, `models.speed.FusedAdapters`): rewritten from the
  pristine copies on every switch, so compiled code never sees a new shape, rank or Python value
  (no recompile) and no switch drifts.

A LoRA at scale 0 is left out entirely: scale 0 is exactly no LoRA.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from api_schemas.errors import ErrorCode, InvalidInput, LoraUnavailable
from api_schemas.loras import AppliedLora, RegisteredLora

if TYPE_CHECKING:
    from models.settings import EngineSettings

logger = logging.getLogger(__name__)

#: The file a folder of the diffusers layout holds (as `edit_lora/` and `gen_lora/` do).
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class LoraFileError(ValueError):
    """A registered LoRA cannot be served; the message names the LoRA, its file and what is wrong."""


@dataclass(frozen=True)
class LoraUpdate:
    """One adapted Linear: `W x + scale * up @ (down @ x)`, the LoRA's own scale (alpha / rank)."""

    down: torch.Tensor  # (rank, in_features), lora_A
    up: torch.Tensor  # (out_features, rank), lora_B
    scale: float


@dataclass(frozen=True)
class LoraWeights:
    """A registered LoRA, converted and checked: its updates by transformer module name (unfused)."""

    name: str
    file: Path
    updates: dict[str, LoraUpdate]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(u.down.nbytes + u.up.nbytes for u in self.updates.values())


def resolve_lora_file(name: str, entry: RegisteredLora) -> Path:
    """The `.safetensors` file of a registry entry: the file itself, the one in a folder (`weight_name`,
    else the diffusers name, else the only one), or the same in a Hub repository's snapshot (fetched
    here, at start, as the other weights are; offline hosts use the Hub cache)."""
    path = Path(entry.path).expanduser()
    if not path.exists() and _HUB_ID.match(entry.path) and not entry.path.startswith("."):
        from huggingface_hub import snapshot_download

        try:
            patterns = [entry.weight_name] if entry.weight_name else ["*.safetensors"]
            path = Path(snapshot_download(entry.path, allow_patterns=patterns))
        except Exception as exc:
            raise LoraFileError(
                f"LoRA {name!r}: {entry.path!r} is not a local file or folder, and as a Hub id it could "
                f"not be fetched: {exc}"
            ) from None
    if path.is_dir():
        if entry.weight_name:
            file = path / entry.weight_name
            if not file.is_file():
                raise LoraFileError(f"LoRA {name!r}: {file} does not exist (weight_name in {path}).")
        elif (path / DEFAULT_WEIGHT_NAME).is_file():
            file = path / DEFAULT_WEIGHT_NAME
        else:
            found = sorted(p.name for p in path.glob("*.safetensors"))
            if len(found) != 1:
                raise LoraFileError(
                    f"LoRA {name!r}: the folder {path} holds {len(found)} .safetensors files "
                    f"({', '.join(found) or 'none'}); name the one to serve with weight_name."
                )
            file = path / found[0]
    elif path.is_file():
        file = path
    else:
        raise LoraFileError(f"LoRA {name!r}: {entry.path} is neither a file nor a folder on this worker.")
    if file.suffix != ".safetensors":
        # Other formats (.bin, .pt, .ckpt) are pickles, which can run code when loaded.
        raise LoraFileError(f"LoRA {name!r}: {file} is not a .safetensors file; convert it to safetensors.")
    return file


def _read_safetensors(name: str, file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraFileError(f"LoRA {name!r}: {file} is not a readable safetensors file ({exc}).") from None


def _peft_scales(metadata: dict[str, str]) -> tuple[float | None, bool, dict[str, float]]:
    """lora_alpha, use_rslora and alpha_pattern from a diffusers file's adapter metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, False, {}
    config = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    if config.get("use_dora"):
        raise ValueError("it is a DoRA adapter, which cannot be served as a LoRA")
    alpha = config.get("lora_alpha")
    return (
        (float(alpha) if alpha is not None else None),
        bool(config.get("use_rslora")),
        dict(config.get("alpha_pattern") or {}),
    )


def read_lora(  # noqa: C901 (one check after another, each naming what is wrong)
    name: str,
    file: Path,
    shape_of: Callable[[str], tuple[int, int] | None],
    max_rank: int,
    dtype: torch.dtype,
) -> LoraWeights:
    """Read, convert and check one LoRA file; `shape_of(module)` is the (in, out) features of the
    transformer's Linear of that name (None: there is none). Raises `LoraFileError` naming the file."""
    from diffusers import FluxKontextPipeline

    raw, metadata = _read_safetensors(name, file)

    def refuse(problem: str) -> LoraFileError:
        return LoraFileError(f"LoRA {name!r}: {file} {problem}")

    if any("dora_scale" in key or "lora_magnitude_vector" in key for key in raw):
        raise refuse("is a DoRA adapter (dora_scale / magnitude keys), which cannot be served as a LoRA.")
    try:
        alpha, rslora, alpha_pattern = _peft_scales(metadata)
        state, alphas = FluxKontextPipeline.lora_state_dict(raw, return_alphas=True)
    except Exception as exc:  # the converters raise ValueError, KeyError, AssertionError, ...
        raise refuse(
            f"is not a FLUX LoRA diffusers can read (a LoRA for another base model?): {exc}"
        ) from None
    if not state:
        raise refuse("holds no LoRA weights.")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith("text_encoder."):
            raise refuse(
                "also adapts the text encoder; only transformer LoRAs are served (drop its te keys)."
            )
        match = _KEY.match(key)
        if match is None:
            raise refuse(f"has a key that is not a transformer LoRA weight: {key}")
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    module_alphas = {
        k.removeprefix("transformer.").removesuffix(".alpha"): float(v) for k, v in (alphas or {}).items()
    }
    updates: dict[str, LoraUpdate] = {}
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise refuse(f"has only lora_{''.join(parts)} for {module}.")
        down, up = parts["A"], parts["B"]
        shape = shape_of(module)
        if shape is None:
            raise refuse(
                f"adapts {module}, which FLUX.1 Kontext's transformer does not have (another base model?)."
            )
        rank = down.shape[0]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != rank or (down.shape[1], up.shape[0]) != shape:
            raise refuse(
                f"has the wrong shapes for {module}: lora_A {tuple(down.shape)}, lora_B {tuple(up.shape)} "
                f"for a Linear of {shape[0]} -> {shape[1]} features (a LoRA for another model size?)."
            )
        if rank > max_rank:
            raise refuse(f"has rank {rank} at {module}, over DREAMOMNI2_MAX_LORA_RANK={max_rank}.")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise refuse(f"has non-finite weights at {module}.")
        module_alpha = module_alphas.get(module)
        for pattern, value in alpha_pattern.items():
            if module == pattern or module.endswith("." + pattern):
                module_alpha = float(value)
        if module_alpha is None:
            module_alpha = alpha if alpha is not None else float(rank)
        scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        updates[module] = LoraUpdate(down.to(dtype).contiguous(), up.to(dtype).contiguous(), scale)
    return LoraWeights(name, file, updates, max(down.shape[0] for down in (u.down for u in updates.values())))


def linear_shapes(transformer: torch.nn.Module) -> Callable[[str], tuple[int, int] | None]:
    """`shape_of` for `read_lora`: a module's (in, out) features if it is a Linear (peft-wrapped or not)."""

    def shape_of(module: str) -> tuple[int, int] | None:
        try:
            layer = transformer.get_submodule(module)
        except AttributeError:
            return None
        layer = getattr(layer, "base_layer", layer)
        if not isinstance(layer, torch.nn.Linear):
            return None
        return layer.in_features, layer.out_features

    return shape_of


class LoraCache:
    """Loaded LoRAs in host memory, least recently used dropped past `capacity_bytes`.

    The LoRA just asked for always stays, even alone over the capacity: a job never waits on a LoRA
    it was promised. Thread-safe (the worker's job thread and its reporting).
    """

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, LoraWeights] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.loads = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str, load: Callable[[], LoraWeights]) -> LoraWeights:
        """The cached LoRA, else `load()` it (and keep it, dropping the least recently used)."""
        with self._lock:
            weights = self._entries.get(name)
            if weights is not None:
                self._entries.move_to_end(name)
                self.hits += 1
                return weights
        weights = load()
        self.put(weights)
        with self._lock:
            self.loads += 1
        return weights

    def put(self, weights: LoraWeights) -> None:
        with self._lock:
            self._entries[weights.name] = weights
            self._entries.move_to_end(weights.name)
            while len(self._entries) > 1 and self.nbytes > self.capacity_bytes:
                self._entries.popitem(last=False)
                self.evictions += 1


@dataclass
class UserLoras:
    """The registered LoRAs of one worker: their files, the modules they adapt, and the cache."""

    files: dict[str, Path]
    shapes: dict[str, tuple[int, int]]
    cache: LoraCache
    max_rank: int
    dtype: torch.dtype
    sizes: dict[str, int] = field(default_factory=dict)
    #: Each LoRA's adapted modules (unfused names), for the planner and the fold's pristine copies.
    modules: dict[str, frozenset[str]] = field(default_factory=dict)
    #: Each file's (size, mtime_ns) when it was read at start: a job refuses a file changed since.
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        registry: dict[str, RegisteredLora],
        transformer: torch.nn.Module,
        *,
        max_rank: int,
        cache_bytes: int,
        dtype: torch.dtype,
    ) -> UserLoras:
        """Read and check every registered LoRA against `transformer` (before any q/k/v fusing); raise
        `LoraFileError` at the first one that cannot be served. The cache keeps what fits."""
        shape_of = linear_shapes(transformer)
        loras = cls({}, {}, LoraCache(cache_bytes), max_rank, dtype)
        for name, entry in registry.items():
            file = resolve_lora_file(name, entry)
            loras.stamps[name] = _stamp(file)
            weights = read_lora(name, file, shape_of, max_rank, dtype)
            loras.files[name] = file
            loras.sizes[name] = weights.nbytes
            loras.modules[name] = frozenset(weights.updates)
            for module in weights.updates:
                loras.shapes[module] = shape_of(module)  # type: ignore[assignment]
            loras.cache.put(weights)
            logger.info("LoRA %s: %s, rank %d, %d layers", name, file, weights.rank, len(weights.updates))
        return loras

    @property
    def targets(self) -> set[str]:
        """Every module some registered LoRA adapts (unfused names)."""
        return set(self.shapes)

    def largest_combination_bytes(self, per_job: int) -> int:
        """The device bytes of the `per_job` largest LoRAs: the most one job can move to the device."""
        return sum(sorted(self.sizes.values(), reverse=True)[:per_job])

    def weights(self, loras: Sequence[AppliedLora]) -> list[tuple[LoraWeights, float]]:
        """The LoRAs of a job with their scales, in order, loading any the cache dropped; scale 0 left out."""
        chosen = []
        for lora in loras:
            if lora.name not in self.files:
                raise InvalidInput(
                    f"No LoRA named {lora.name!r} is registered on this worker (it has: "
                    f"{', '.join(sorted(self.files)) or 'none'}).",
                    code=ErrorCode.UNKNOWN_LORA,
                    details={"field": "loras", "name": lora.name, "available": sorted(self.files)},
                )
            if lora.scale == 0:
                continue
            self._check_unchanged(lora.name)
            chosen.append((self.cache.get(lora.name, lambda name=lora.name: self._reload(name)), lora.scale))
        return chosen

    def _check_unchanged(self, name: str) -> None:
        """Refuse a LoRA whose file changed or went missing since start (`LoraUnavailable`): the weights
        it was checked with may be gone from the cache, and a silently different LoRA is worse."""
        file = self.files[name]
        try:
            stamp = _stamp(file)
        except OSError:
            stamp = None
        if stamp != self.stamps.get(name):
            problem = "is missing" if stamp is None else "changed"
            raise LoraUnavailable(
                f"The file of LoRA {name!r} {problem} on the worker since it started; the operator must "
                "restore it, or restart the workers to serve the new file.",
                details={"name": name},
            )

    def _reload(self, name: str) -> LoraWeights:
        try:
            return read_lora(name, self.files[name], self.shapes.get, self.max_rank, self.dtype)
        except LoraFileError as exc:  # changed between the check and the read
            raise LoraUnavailable(str(exc), details={"name": name}) from None

    def describe(self) -> dict:
        """What a worker reports: each LoRA's rank-independent size, and the cache's state."""
        return {
            "registered": sorted(self.files),
            "cache_bytes": self.cache.nbytes,
            "cache_capacity_bytes": self.cache.capacity_bytes,
            "cached": [name for name in self.files if name in self.cache],
        }


class SidePath:
    """Registered LoRAs beside the layers they adapt, unfused (the `reference` profile's way).

    A forward hook on every module some registered LoRA adapts adds `scale * up @ (down @ x)` for each
    LoRA of the current job, after the layer's own output (which includes a DreamOmni2 LoRA's, peft's
    side path). With no LoRA set the hooks return the layer's output untouched, bit for bit.
    """

    def __init__(self, transformer: torch.nn.Module, modules: Iterable[str]):
        self.active: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        #: What `active` holds: (name, scale) of each LoRA in order, and the device.
        self._key: tuple = ((), None)
        self._handles = [
            transformer.get_submodule(name).register_forward_hook(self._hook(name))
            for name in sorted(modules)
        ]

    def _hook(self, name: str) -> Callable:
        def add_loras(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            updates = self.active.get(name)
            if not updates:
                return None
            x = args[0]
            for down, up, scale in updates:
                if down.device != x.device:  # a memory mode that moved the layer after `set`
                    down, up = down.to(x.device), up.to(x.device)
                # As peft computes an unfused LoRA: the low-rank path, scaled, added to the output.
                output = output + torch.nn.functional.linear(torch.nn.functional.linear(x, down), up) * scale
            return output

        return add_loras

    def set(self, loras: list[tuple[LoraWeights, float]], device: torch.device | str) -> None:
        """Make `loras` (with their scales) the ones in effect, their weights moved to `device`.

        The same LoRAs at the same scales keep the device copies they have: a name stands for one file,
        unchanged since start (`UserLoras.weights` checks), so there is nothing to copy again.
        """
        key = (tuple((weights.name, scale) for weights, scale in loras), str(device))
        if key == self._key:
            return
        # The previous job's device copies go first: they are not held through the copies below (nor
        # left behind in the hooks if one fails), and the next call after a failure sets all anew.
        self.active, self._key = {}, ((), None)
        active: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for weights, scale in loras:
            for module, update in weights.updates.items():
                active.setdefault(module, []).append(
                    (update.down.to(device), update.up.to(device), update.scale * scale)
                )
        self.active, self._key = active, key

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.active, self._key = {}, ((), None)


def load_user_loras(settings: EngineSettings, pipeline: torch.nn.Module) -> UserLoras | None:
    """The registered LoRAs of `settings` read and checked against `pipeline`'s transformer (None: no
    LoRA registered); raises `LoraFileError` for the first that cannot be served."""
    limits = settings.limits
    if not limits.loras:
        return None
    return UserLoras.load(
        limits.loras,
        pipeline.transformer,
        max_rank=limits.max_lora_rank,
        cache_bytes=settings.lora_cache_bytes,
        dtype=pipeline.transformer.dtype,
    )


def _stamp(file: Path) -> tuple[int, int]:
    info = file.stat()
    return info.st_size, info.st_mtime_ns
