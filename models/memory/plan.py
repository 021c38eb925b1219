"""The plan: a job's peak on each device in a memory mode, and the host memory the mode pins.

The peak of each stage (translate, encode_prompt, encode_images, denoise, decode) on each device is
the weights present in that stage plus that stage's activations (`models.memory.tracing`); the job's
peak is the largest. Host memory is what the mode keeps off the GPU: the swapped and streamed
groups' weights, packed into power-of-two blocks exactly as `models.pinned.HostBlocks` pins them,
and any model placed on the CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from models.memory.sizes import ArchitectureSizes, GiB, published_sizes
from models.memory.tracing import activations, job_shape, mixing_activations, text_job_bytes
from models.memory.user_loras import UserLoraSizes
from models.modes import (
    GROUP_STAGES,
    MODES,
    Group,
    MemoryMode,
    Residency,
    Stage,
    is_cpu,
    same_device,
    translator_residency,
)
from models.pinned import pack_blocks

if TYPE_CHECKING:
    from api_schemas.jobs import JobLimits

#: The components of each group that moves (the VAE never does).
GROUP_COMPONENTS: dict[Group, tuple[str, ...]] = {
    Group.TRANSLATOR: ("translator",),
    Group.TEXT_ENCODERS: ("t5_xxl", "clip_l"),
    Group.TRANSFORMER: ("transformer", "edit_lora", "gen_lora"),
}


@dataclass
class ComponentPlan:
    bytes: int
    dtype: str
    device: str
    residency: str
    group: str | None  # what it moves with (`models.modes.Group`); None: always resident

    def bytes_in(self, stage: Stage, stream_window: int) -> int:
        """Its bytes on the device during `stage`."""
        residency = Residency(self.residency)
        if residency is Residency.RESIDENT:
            return self.bytes
        if stage not in GROUP_STAGES[Group(self.group)]:
            return 0
        if residency is Residency.STREAMED:
            # The transformer holds only its streaming window; its LoRAs stream with their blocks
            # and are counted whole, which errs on the safe side by their 0.4 GB.
            return min(self.bytes, stream_window)
        return self.bytes


@dataclass
class MemoryPlan:
    """A predicted job peak: components, activations, per-stage and per-device totals (bytes), and the
    host memory the mode keeps (`host_bytes`, per group or component in `host`)."""

    mode: str
    images: int
    size: int
    #: Output images sampled together (`DREAMOMNI2_BATCH_IMAGES`; 1: one after another).
    batch: int
    device: str
    translator_device: str | None
    components: dict[str, ComponentPlan]
    activations: dict[str, int]
    stages: dict[str, dict[str, int]]
    devices: dict[str, int]
    peak_bytes: int
    peak_device: str
    peak_stage: str
    host_bytes: int = 0
    host: dict[str, int] = field(default_factory=dict)
    lora_rank_assumed: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A human-readable table of the plan, in GiB."""

        def gib(n: int) -> str:
            return f"{n / GiB:7.2f} GiB"

        lines = [
            f"memory mode {self.mode}: {MODES[MemoryMode(self.mode)].summary}",
            f"{self.images} input image(s) at {self.size}x{self.size}"
            + (f", {self.batch} output images sampled together" if self.batch > 1 else "")
            + f"; pipeline on {self.device}"
            + (f", translator on {self.translator_device}" if self.translator_device else ", no translator"),
            "",
            f"{'component':<12} {'weights':>11}  {'dtype':<22} {'device':<8} residency",
        ]
        for name, c in self.components.items():
            lines.append(f"{name:<12} {gib(c.bytes)}  {c.dtype:<22} {c.device:<8} {c.residency}")
        lines += ["", f"{'stage':<14} {'activations':>11}  peak per device"]
        for stage, per_device in self.stages.items():
            peaks = ", ".join(f"{d} {n / GiB:.2f} GiB" for d, n in per_device.items())
            lines.append(f"{stage:<14} {gib(self.activations[stage])}  {peaks}")
        lines += [""] + [f"predicted peak on {d}: {gib(n)}" for d, n in self.devices.items()]
        lines.append(
            f"job peak: {gib(self.peak_bytes)} on {self.peak_device} during {self.peak_stage} "
            "(PyTorch allocations; the CUDA context comes on top)"
        )
        held = ", ".join(f"{name} {n / GiB:.2f}" for name, n in self.host.items())
        lines.append(f"host memory: {gib(self.host_bytes)} ({held} GiB)" if held else "host memory: none")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan_memory(
    mode: MemoryMode | str,
    images: int,
    size: int = 1024,
    *,
    device: str = "cuda",
    translator_device: str | None = "auto",
    new_tokens: int | None = None,
    sizes: ArchitectureSizes | None = None,
    feature_mixing: bool = False,
    mixing_batched: bool = False,
    include_cpu: bool = False,
    speed: str = "reference",
    batch: int = 1,
    user_loras: UserLoraSizes | None = None,
    text_jobs: JobLimits | None = None,
) -> MemoryPlan:
    """Predict the GPU peak of a job of `images` inputs at `size` in `mode`, without loading weights.

    `translator_device` is where the translator runs ("auto": the pipeline's device; None: no
    translator). `new_tokens` is its answer budget (default: the engine's default). `sizes` defaults
    to the published release's architectures. `feature_mixing`: a Feature Mixing pair instead (no
    input image, no translation; `mixing_batched`: its batch-2 form). `include_cpu`: plan a CPU
    device's stages too, as if it were an accelerator (the tests' live-memory ledger compares with it).
    `speed`: the speed profile; a compiled one keeps pristine copies of the adapted weights, counted
    in host memory (a worker with room to spare on the GPU keeps them there instead). `batch`: output
    images of one job sampled together (a Feature Mixing pair is always one). `user_loras`: the
    registered LoRAs (DREAMOMNI2_LORAS, `models.memory.user_loras`): the largest combination one job
    may stack, counted on the pipeline's device for the whole job (they move there when the job sets
    its adapters); their host cache; under a compiled profile, the pristine copies of the weights only
    they adapt, packed with the DreamOmni2 LoRAs' ones. `text_jobs`: the limits of the text tasks
    (judge, mixing_prompts) the translator also runs; its stage is then the larger of a translation
    and the worst text job they admit.
    """
    from models.translator import DEFAULT_MAX_NEW_TOKENS

    _check_job(images, size, feature_mixing, batch)
    mode = MemoryMode(mode)
    sizes = sizes or published_sizes()
    new_tokens = DEFAULT_MAX_NEW_TOKENS if new_tokens is None else new_tokens
    if translator_device == "auto":
        translator_device = device
    shape = job_shape(images, size, sizes.vlm_pixels)
    act = activations(sizes, shape, new_tokens if translator_device else 0, lora=images > 0, batch=batch)
    if translator_device is None:
        act[Stage.TRANSLATE.value] = 0
    elif text_jobs is not None:
        worst = text_job_bytes(sizes, shape, text_jobs)
        act[Stage.TRANSLATE.value] = max(act[Stage.TRANSLATE.value], worst)
    if feature_mixing:
        act.update(mixing_activations(sizes, shape, mixing_batched))

    components = plan_components(mode, sizes, device, translator_device)
    if user_loras is not None and user_loras.device_bytes:
        resident = Residency.RESIDENT.value
        components["user_loras"] = ComponentPlan(user_loras.device_bytes, sizes.dtype, device, resident, None)
    stages = stage_totals(mode, sizes, components, act, device, translator_device, include_cpu)
    devices: dict[str, int] = {}
    for per_device in stages.values():
        for d, n in per_device.items():
            devices[d] = max(devices.get(d, 0), n)
    peak_bytes, peak_device, peak_stage = max(
        ((n, d, stage) for stage, per_device in stages.items() for d, n in per_device.items()),
        default=(0, str(device), Stage.DENOISE.value),
    )
    host = host_memory(mode, sizes, components)
    if speed != "reference":
        # One set of host blocks holds them all (`FusedAdapters.from_peft`): packed together.
        lora_only = user_loras.lora_only_weight_bytes if user_loras is not None else ()
        host["pristine_adapted_weights"] = pack_blocks([*sizes.adapted_weight_bytes, *lora_only]).nbytes
    if user_loras is not None and user_loras.cache_bytes:
        host["user_lora_cache"] = user_loras.cache_bytes
    notes = plan_notes(sizes, device, include_cpu, feature_mixing, mixing_batched)
    return MemoryPlan(
        mode=mode.value,
        images=images,
        size=size,
        batch=batch,
        device=str(device),
        translator_device=str(translator_device) if translator_device else None,
        components=components,
        activations=act,
        stages=stages,
        devices=devices,
        peak_bytes=peak_bytes,
        peak_device=peak_device,
        peak_stage=peak_stage,
        host_bytes=sum(host.values()),
        host=host,
        lora_rank_assumed=sizes.lora_rank_assumed,
        notes=notes,
    )


def plan_notes(
    sizes: ArchitectureSizes, device: str, include_cpu: bool, feature_mixing: bool, mixing_batched: bool
) -> list[str]:
    """What a reader of the plan should know about its assumptions."""
    notes = []
    if sizes.lora_rank_assumed:
        notes.append(
            f"LoRA sizes assume rank {sizes.lora_rank_assumed} (the release does not state it); "
            "with the adapter files local, their headers are read instead."
        )
    if is_cpu(device) and not include_cpu:
        notes.append("the pipeline runs on the CPU: nothing is planned on a GPU.")
    if feature_mixing:
        form = "one batch-2 pass" if mixing_batched else "two batch-1 passes, the source's keys kept"
        notes.append(f"a Feature Mixing pair: every layer mixing, {form} per step; no translation.")
    return notes


def _check_job(images: int, size: int, feature_mixing: bool, batch: int) -> None:
    if images < 0:
        raise ValueError(f"images must be 0 or more, got {images}")
    if batch < 1 or (feature_mixing and batch != 1):
        raise ValueError(f"batch must be 1 or more (1 for a Feature Mixing pair), got {batch}")
    if feature_mixing and images:
        raise ValueError(f"a Feature Mixing job takes no input image, got images={images}")
    if size < 64 or size % 16:
        raise ValueError(f"size must be a multiple of 16 of at least 64, got {size}")


def plan_components(
    mode: MemoryMode, sizes: ArchitectureSizes, device: str, translator_device: str | None
) -> dict[str, ComponentPlan]:
    """Each component's bytes as stored in `mode`, its device, and how it uses that device."""
    spec = MODES[mode]
    dtype = sizes.dtype
    transformer_bytes = (
        sizes.transformer_fp8_bytes if spec.fp8_transformer else sizes.weight_bytes["transformer"]
    )
    transformer_dtype = f"float8_e4m3fn + {dtype}" if spec.fp8_transformer else dtype
    lora_bytes = {name: numel * sizes.itemsize for name, numel in sizes.lora_numel.items()}
    tr, tg = spec.transformer.value, Group.TRANSFORMER.value
    te, teg = spec.text_encoders.value, Group.TEXT_ENCODERS.value
    components = {
        "transformer": ComponentPlan(transformer_bytes, transformer_dtype, device, tr, tg),
        "edit_lora": ComponentPlan(lora_bytes["edit_lora"], dtype, device, tr, tg),
        "gen_lora": ComponentPlan(lora_bytes["gen_lora"], dtype, device, tr, tg),
        "t5_xxl": ComponentPlan(sizes.weight_bytes["t5_xxl"], dtype, device, te, teg),
        "clip_l": ComponentPlan(sizes.weight_bytes["clip_l"], dtype, device, te, teg),
        "vae": ComponentPlan(sizes.weight_bytes["vae"], dtype, device, Residency.RESIDENT.value, None),
    }
    if translator_device is not None:
        residency = translator_residency(mode, device, translator_device)
        components["translator"] = ComponentPlan(
            sizes.weight_bytes["translator"],
            dtype,
            str(translator_device),
            residency.value,
            Group.TRANSLATOR.value,
        )
    return components


def group_tensor_bytes(mode: MemoryMode, sizes: ArchitectureSizes, group: Group) -> list[int]:
    """The byte size of every tensor a group moves in `mode` (LoRAs with the transformer)."""
    if group is Group.TRANSFORMER:
        fp8 = MODES[mode].fp8_transformer
        found = list(sizes.transformer_fp8_tensor_bytes if fp8 else sizes.tensor_bytes["transformer"])
        for numels in sizes.lora_tensor_numels.values():
            found += [numel * sizes.itemsize for numel in numels]
        return found
    return [size for name in GROUP_COMPONENTS[group] for size in sizes.tensor_bytes.get(name, ())]


def host_memory(
    mode: MemoryMode, sizes: ArchitectureSizes, components: dict[str, ComponentPlan]
) -> dict[str, int]:
    """Host bytes the mode keeps: per swapped or streamed group, its blocks (`models.pinned`, pinned
    next to a GPU); per component resident on the CPU, its weights."""
    host: dict[str, int] = {}
    for group in Group:
        members = [components[name] for name in GROUP_COMPONENTS[group] if name in components]
        if not members or Residency(members[0].residency) is Residency.RESIDENT:
            continue
        if Residency(members[0].residency) is Residency.STREAMED and is_cpu(members[0].device):
            # On a CPU the streamed blocks compute in place: nothing is packed or pinned.
            host[group.value] = sum(comp.bytes for comp in members)
        else:
            host[group.value] = pack_blocks(group_tensor_bytes(mode, sizes, group)).nbytes
    for name, comp in components.items():
        if is_cpu(comp.device) and Residency(comp.residency) is Residency.RESIDENT:
            host[name] = comp.bytes
    return host


def stage_totals(
    mode: MemoryMode,
    sizes: ArchitectureSizes,
    components: dict[str, ComponentPlan],
    act: dict[str, int],
    device: str,
    translator_device: str | None,
    include_cpu: bool = False,
) -> dict[str, dict[str, int]]:
    """Bytes on each GPU during each stage: the weights present then, plus the stage's activations."""
    # fp8 storage upcasts one layer at a time to compute with it: a transient of its own.
    cast = sizes.largest_cast_layer_bytes if MODES[mode].fp8_transformer else 0
    counted = (lambda d: True) if include_cpu else (lambda d: not is_cpu(d))
    stages: dict[str, dict[str, int]] = {}
    for stage in Stage:
        per_device: dict[str, int] = {}
        for comp in components.values():
            weight = comp.bytes_in(stage, sizes.stream_window_bytes)
            if weight and counted(comp.device):
                per_device[comp.device] = per_device.get(comp.device, 0) + weight
        stage_device = translator_device if stage is Stage.TRANSLATE else device
        if stage_device is not None and counted(stage_device):
            key = _device_key(stage_device, components)
            extra = cast if stage in GROUP_STAGES[Group.TRANSFORMER] else 0
            per_device[key] = per_device.get(key, 0) + act[stage.value] + extra
        stages[stage.value] = per_device
    return stages


def _device_key(device: str, components: dict[str, ComponentPlan]) -> str:
    # Name a device the way the components do, so that `cuda` and `cuda:0` add up in one entry.
    for comp in components.values():
        if same_device(comp.device, device):
            return comp.device
    return str(device)
