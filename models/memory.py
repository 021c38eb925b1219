"""The memory planner: a worker's GPU peak in a memory mode, predicted without loading a weight.

A worker holds five networks: the FLUX.1 Kontext transformer (with both LoRAs), T5-XXL, CLIP-L, the
VAE and the Qwen2.5-VL translator. The memory mode (`models.modes.MODES`, the table the engine's
placement also reads) says which of them are on the GPU in which stage of a job.

The planner predicts a job's peak without loading a weight:

- weights: the full-size architectures built on the meta device (sizes exact; the fp8 mode applies
  diffusers' own layerwise casting to the meta transformer, so the bytes it keeps in bf16 are the
  ones the worker keeps); LoRA sizes from the files' headers, or an assumed rank where none is local;
- activations: the real diffusers / transformers forward code run on fake tensors (no memory, no
  compute) while every tensor it creates is counted, for the transformer (one double and one single
  block: blocks free their temporaries before the next starts), the VAE and both text encoders; the
  translator (Qwen2.5-VL, whose forward needs real values) from a formula over its config;
- the peak of each stage (translate, encode_prompt, encode_images, denoise, decode) on each device:
  weights present in that stage plus that stage's activations. The job's peak is the largest.

A Feature Mixing job (`models.mixing`, `plan_memory(..., feature_mixing=True)`) has no input image and
no translation; its denoise step is traced the same way, with the mixing processors installed: both
branches (two batch-1 passes, or one batch-2 pass when batched) and the target's attention over the
source's noise keys, plus the source's keys and values the sequential form keeps for every layer.
`mixing_cost` sets it against one generation of the same size (activations, job peak, FLOPs).

The prediction is of the memory PyTorch allocates; the CUDA context (a few hundred MiB, outside
PyTorch) is not in it, which is why the start-up check compares it with the memory still free once
the context exists (`torch.cuda.mem_get_info`), with `FIT_HEADROOM` to spare for the allocator's
fragmentation and library workspaces.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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

if TYPE_CHECKING:
    from models.architectures import FullSizeModels

GiB = 1024**3
#: Spare memory the start-up check keeps beyond the prediction (allocator fragmentation, cuBLAS and
#: attention workspaces, which the fake-tensor trace cannot see).
FIT_HEADROOM = 0.05
#: LoRA rank assumed for the published adapters when their files are not local (the release does not
#: state it); a rank-64 LoRA on the attention projections is about 0.2 GB in bf16.
ASSUMED_LORA_RANK = 64
#: Text tokens the translator reads besides the images: chat template, task suffix and an
#: instruction of up to about 2000 characters.
TRANSLATOR_TEXT_TOKENS = 1024
#: T5's prompt length in the reference (and the pipeline's max_sequence_length).
T5_TOKENS = 512
CLIP_TOKENS = 77


# Tensor counting on fake tensors ---------------------------------------------------------------------
class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage the traced code creates and tracks the largest total alive.

    Storages the caller already holds (weights, buffers) are registered first and never counted; a
    storage is counted once however many views of it appear, and uncounted when it is freed.
    """

    def __init__(self, known: Iterable[torch.Tensor]):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()
        self._known = []
        for tensor in known:
            storage = tensor.untyped_storage()
            self._known.append(storage)
            self._seen.add(id(storage))

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:  # noqa: ANN401 (whatever the operator returns)
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._count(item)
        return out


def traced_peak_bytes(build: Callable[[], torch.nn.Module], run: Callable[[torch.nn.Module], Any]) -> int:
    """Peak bytes of the tensors `run(model)` creates, on fake tensors: no memory used, no compute done.

    `build` makes the model (on the meta device, in bf16 unless it says otherwise); its weights become
    fake tensors of the same shapes and dtypes. Inputs should be made inside `run`, so that they
    count; so does the output while it is alive.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from models.architectures import building_on

    with building_on("meta", torch.bfloat16):
        model = build()
    with FakeTensorMode():
        _fake_weights(model)
        known = [*model.parameters(), *model.buffers()]
        with _LiveBytes(known) as tracker, torch.no_grad():
            result = run(model)
            del result
        return tracker.peak


def _fake_weights(model: torch.nn.Module) -> None:
    # Assigned in place rather than through `Module.to`/`_apply`, which cannot swap fake tensors in.
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype), requires_grad=False
                )
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)


# Model sizes -----------------------------------------------------------------------------------------
def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (`parameters()` yields tied ones once)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def safetensors_numel(path: Path) -> int:
    """Number of elements in a safetensors file, from its header alone (no tensor is read)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def lora_numel(transformer: torch.nn.Module, rank: int, targets: Iterable[str]) -> int:
    """Elements of a rank-`rank` LoRA on every Linear whose name ends with one of `targets`."""
    targets = tuple(targets)
    total = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def fp8_storage(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Store the transformer's weights in fp8 (e4m3) and compute in `compute_dtype`, layer by layer.

    diffusers' layerwise casting with its defaults: norms, embeddings and the LoRA layers stay in the
    compute dtype. Called on the worker's transformer after the LoRAs are loaded, and on the meta
    transformer by the planner, so both count the same bytes.
    """
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


@dataclass(frozen=True)
class ArchitectureSizes:
    """Everything the planner needs to know about the models, read off configs (no weights)."""

    transformer_config: dict[str, Any]
    vae_config: dict[str, Any]
    t5_config: dict[str, Any]
    clip_config: dict[str, Any]
    vlm_text: dict[str, int]
    vlm_vision: dict[str, int]
    vlm_pixels: tuple[int, int]  # the translator processor's (min_pixels, max_pixels)
    bytes_bf16: dict[str, int]  # per component, bf16 storage
    transformer_fp8_bytes: int
    largest_cast_layer_bytes: int  # the biggest layer layerwise casting upcasts at once (bf16)
    stream_window_bytes: int  # two neighbouring blocks plus the non-block layers (bf16)
    lora_numel: dict[str, int]
    lora_rank_assumed: int | None
    lora_targets: tuple[str, ...]
    lora_rank: int

    @classmethod
    def build(
        cls,
        models: FullSizeModels,
        *,
        vlm_pixels: tuple[int, int],
        lora_files: dict[str, Path] | None = None,
        lora_rank: int = ASSUMED_LORA_RANK,
    ) -> ArchitectureSizes:
        """Size `models` (a `FullSizeModels` on the meta device, bf16)."""
        from models.architectures import LORA_TARGET_MODULES

        transformer = models.transformer
        sizes = {
            "transformer": module_bytes(transformer),
            "t5_xxl": module_bytes(models.text_encoder_2),
            "clip_l": module_bytes(models.text_encoder),
            "vae": module_bytes(models.vae),
            "translator": module_bytes(models.vlm) if models.vlm is not None else 0,
        }
        block_bytes = [
            module_bytes(b) for b in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        ]
        in_blocks = sum(block_bytes)
        window = (
            max(a + b for a, b in zip(block_bytes, block_bytes[1:], strict=False))
            if len(block_bytes) > 1
            else block_bytes[0]
        )
        fp8_storage(transformer, torch.bfloat16)
        fp8_bytes = module_bytes(transformer)
        # The largest layer the casting upcasts to bf16 for its forward (those kept in bf16 never are).
        largest_cast = max(
            m.weight.numel() * 2
            for m in transformer.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float8_e4m3fn
        )

        lora_files = lora_files or {}
        lora, assumed = {}, None
        for name in ("edit_lora", "gen_lora"):
            path = lora_files.get(name)
            if path is not None and path.is_file():
                lora[name] = safetensors_numel(path)
            else:
                lora[name] = lora_numel(transformer, lora_rank, LORA_TARGET_MODULES)
                assumed = lora_rank
        vlm = models.vlm
        text = vlm.config.text_config if vlm is not None else None
        vision = vlm.config.vision_config if vlm is not None else None
        return cls(
            transformer_config=dict(transformer.config),
            vae_config=dict(models.vae.config),
            t5_config=models.text_encoder_2.config.to_dict(),
            clip_config=models.text_encoder.config.to_dict(),
            vlm_text=_pick(
                text,
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_key_value_heads",
                "num_attention_heads",
                "vocab_size",
            ),  # fmt: skip
            vlm_vision=_pick(
                vision,
                "hidden_size",
                "intermediate_size",
                "patch_size",
                "spatial_merge_size",
                "temporal_patch_size",
                "in_channels",
                "num_heads",
                "out_hidden_size",
            ),  # fmt: skip
            vlm_pixels=vlm_pixels,
            bytes_bf16=sizes,
            transformer_fp8_bytes=fp8_bytes,
            largest_cast_layer_bytes=largest_cast,
            stream_window_bytes=window + (sizes["transformer"] - in_blocks),
            lora_numel=lora,
            lora_rank_assumed=assumed,
            lora_targets=tuple(LORA_TARGET_MODULES),
            lora_rank=lora_rank,
        )


def _pick(config: object | None, *names: str) -> dict[str, int]:
    return {} if config is None else {name: getattr(config, name) for name in names}


@functools.cache
def published_sizes(lora_rank: int = ASSUMED_LORA_RANK) -> ArchitectureSizes:
    """Sizes of the published release (FLUX.1 Kontext [dev] + DreamOmni2), from built-in configs."""
    from models.architectures import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, build_full_size

    return ArchitectureSizes.build(
        build_full_size("meta", torch.bfloat16),
        vlm_pixels=(QWEN_MIN_PIXELS, QWEN_MAX_PIXELS),
        lora_rank=lora_rank,
    )


def layout_sizes(kontext: str | Path, edit_lora: Path, gen_lora: Path, vlm: Path) -> ArchitectureSizes:
    """Sizes of the models a worker will load, read off their local folders (configs, file headers).

    A part with no local folder (the base model still named by its Hub id, say) is sized from the
    published architecture instead, and LoRAs with no local file from `ASSUMED_LORA_RANK`.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoConfig, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from transformers import Qwen2_5_VLForConditionalGeneration as QwenVL

    from models import architectures as arch
    from models.adapters import LORA_WEIGHT_NAME

    kontext = Path(kontext)
    local = (kontext / "transformer" / "config.json").is_file()
    with arch.building_on("meta", torch.bfloat16):
        if local:
            transformer = FluxTransformer2DModel.from_config(
                FluxTransformer2DModel.load_config(kontext / "transformer")
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(kontext / "vae"))
            clip = CLIPTextModel(CLIPTextConfig.from_pretrained(kontext / "text_encoder"))
            t5 = T5EncoderModel(T5Config.from_pretrained(kontext / "text_encoder_2"))
        else:
            transformer, vae = arch.build_flux_transformer(), arch.build_flux_vae()
            clip, t5 = arch.build_clip_l(), arch.build_t5_xxl()
        vlm_model = (
            QwenVL(AutoConfig.from_pretrained(vlm))
            if (vlm / "config.json").is_file()
            else arch.build_qwen25_vl_7b()
        )
        models = arch.FullSizeModels(transformer, vae, clip, t5, vlm_model)
    return ArchitectureSizes.build(
        models,
        vlm_pixels=_processor_pixels(vlm),
        lora_files={"edit_lora": edit_lora / LORA_WEIGHT_NAME, "gen_lora": gen_lora / LORA_WEIGHT_NAME},
    )


def _processor_pixels(vlm: Path) -> tuple[int, int]:
    from models.architectures import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

    for name in ("preprocessor_config.json", "processor_config.json"):
        path = vlm / name
        if path.is_file():
            config = json.loads(path.read_text())
            config = config.get("image_processor", config)
            size = config.get("size") or {}
            return (
                int(config.get("min_pixels") or size.get("shortest_edge") or QWEN_MIN_PIXELS),
                int(config.get("max_pixels") or size.get("longest_edge") or QWEN_MAX_PIXELS),
            )
    return QWEN_MIN_PIXELS, QWEN_MAX_PIXELS


# Shapes of a job -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobShape:
    """The worst case of a job at one size: the largest bucket for every input and the output."""

    images: int
    size: int
    input_wh: tuple[int, int]
    output_wh: tuple[int, int]
    vision_patches: int  # per input image, before the 2x2 merge

    @property
    def tokens_per_input(self) -> int:
        return (self.input_wh[0] // 16) * (self.input_wh[1] // 16)

    @property
    def output_tokens(self) -> int:
        return (self.output_wh[0] // 16) * (self.output_wh[1] // 16)

    @property
    def image_tokens(self) -> int:
        """Noisy latent plus every input image, in packed tokens (the text adds T5_TOKENS)."""
        return self.output_tokens + self.images * self.tokens_per_input


def job_shape(
    images: int, size: int, vlm_pixels: tuple[int, int], patch: int = 14, merge: int = 2
) -> JobShape:
    """The largest bucket (inputs) and output (edit of any bucket, or generation) at `size`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from models.pipeline import KONTEXT_BUCKETS, output_size, scale_buckets

    buckets = KONTEXT_BUCKETS if size == 1024 else scale_buckets(KONTEXT_BUCKETS, size / 1024)
    area = size * size
    input_wh = max(buckets, key=lambda wh: (wh[0] // 16) * (wh[1] // 16))
    outputs = [output_size(w, h, area) for w, h in [*buckets, (size, size)]]
    output_wh = max(outputs, key=lambda wh: (wh[0] // 16) * (wh[1] // 16))
    patches = 0
    for w, h in buckets:
        grid_h, grid_w = smart_resize(
            h, w, factor=patch * merge, min_pixels=vlm_pixels[0], max_pixels=vlm_pixels[1]
        )
        patches = max(patches, (grid_h // patch) * (grid_w // patch))
    return JobShape(images, size, input_wh, output_wh, patches)


# Activations -----------------------------------------------------------------------------------------
@functools.cache
def _denoise_bytes(config_json: str, lora_rank: int, lora_targets: tuple[str, ...], tokens: int) -> int:
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    config = json.loads(config_json)
    config.update(num_layers=1, num_single_layers=1)
    text_dim = config["joint_attention_dim"]

    def build() -> torch.nn.Module:
        model = FluxTransformer2DModel.from_config(config).eval()
        if lora_rank:
            model.add_adapter(
                LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(lora_targets))
            )
        return model

    def run(model: torch.nn.Module) -> object:
        bf16 = torch.bfloat16
        return model(
            hidden_states=torch.empty(1, tokens, config["in_channels"], dtype=bf16),
            encoder_hidden_states=torch.empty(1, T5_TOKENS, text_dim, dtype=bf16),
            pooled_projections=torch.empty(1, config["pooled_projection_dim"], dtype=bf16),
            timestep=torch.ones(1, dtype=bf16),
            guidance=torch.ones(1),
            img_ids=torch.zeros(tokens, 3, dtype=bf16),
            txt_ids=torch.zeros(T5_TOKENS, 3, dtype=bf16),
            return_dict=False,
        )

    return traced_peak_bytes(build, run)


@functools.cache
def _mixing_denoise_bytes(config_json: str, tokens: int, batched: bool) -> int:
    """Peak activation bytes of one Feature Mixing step with every layer mixing, `tokens` noise tokens.

    Traced on one double and one single block as `_denoise_bytes` is, with the mixing processors
    installed: the source pass then the target pass (or one batch-2 pass). The sequential form keeps
    the source's noise keys and values of every layer until the target pass uses them; the trace
    holds those of its two layers, the other layers' are added (all held at once: a bound, since the
    target pass frees each as it goes).
    """
    from diffusers import FluxTransformer2DModel

    from models.mixing import MixingConfig, MixingPhase, feature_mixing

    config = json.loads(config_json)
    layers = config["num_layers"] + config["num_single_layers"]
    config.update(num_layers=1, num_single_layers=1)

    def run(model: torch.nn.Module) -> object:
        bf16 = torch.bfloat16

        def call(batch: int) -> torch.Tensor:
            return model(
                hidden_states=torch.empty(batch, tokens, config["in_channels"], dtype=bf16),
                encoder_hidden_states=torch.empty(
                    batch, T5_TOKENS, config["joint_attention_dim"], dtype=bf16
                ),
                pooled_projections=torch.empty(batch, config["pooled_projection_dim"], dtype=bf16),
                timestep=torch.ones(batch, dtype=bf16),
                guidance=torch.ones(batch),
                img_ids=torch.zeros(tokens, 3, dtype=bf16),
                txt_ids=torch.zeros(T5_TOKENS, 3, dtype=bf16),
                return_dict=False,
            )[0]

        with feature_mixing(model, MixingConfig(batched=batched)) as state:
            state.active, state.text_tokens, state.noise_tokens = True, T5_TOKENS, tokens
            if batched:
                state.phase = MixingPhase.PAIRED
                return call(2)
            state.phase = MixingPhase.CAPTURE
            source = call(1)
            state.phase = MixingPhase.INJECT
            return source, call(1)

    peak = traced_peak_bytes(lambda: FluxTransformer2DModel.from_config(config).eval(), run)
    return peak + (0 if batched else (layers - 2) * kept_kv_bytes(config, tokens, 1))


def kept_kv_bytes(transformer_config: dict[str, Any], tokens: int, layers: int | None = None) -> int:
    """Bytes (bf16) of the source's noise keys and values the sequential form keeps for `layers` layers
    (default: every layer of the transformer) between the source pass and the target pass."""
    if layers is None:
        layers = transformer_config["num_layers"] + transformer_config["num_single_layers"]
    inner = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    return layers * 2 * tokens * inner * 2


def transformer_flops(
    transformer_config: dict[str, Any], text_tokens: int, image_tokens: int, extra_keys: int = 0
) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of one FLUX transformer pass, batch 1.

    Every block, double or single, costs 24 d^2 per token in its linears (q/k/v 6, output 2, MLP 16;
    a single block's fused MLP and output the same) and 4 S (S + E) d in attention (scores and the
    weighted sum over S own keys plus E extra ones: the source keys of Feature Mixing), with d the
    model width and S = text + image tokens; plus the input and output projections. Per-sample
    modulation and the embedders are left out (well under 0.1 %).
    """
    c = transformer_config
    d = c["num_attention_heads"] * c["attention_head_dim"]
    seq = text_tokens + image_tokens
    blocks = c["num_layers"] + c["num_single_layers"]
    per_block = 24 * d * d * seq + 4 * seq * (seq + extra_keys) * d
    projections = 2 * d * (c["in_channels"] * image_tokens + c["joint_attention_dim"] * text_tokens)
    projections += 2 * d * c["in_channels"] * image_tokens  # proj_out back to the latent channels
    return blocks * per_block + projections


@functools.cache
def _vae_bytes(config_json: str, width: int, height: int, decode: bool) -> int:
    from diffusers import AutoencoderKL

    config = json.loads(config_json)

    def run(model: torch.nn.Module) -> object:
        if decode:
            latents = torch.empty(1, config["latent_channels"], height // 8, width // 8, dtype=torch.bfloat16)
            return model.decode(latents, return_dict=False)[0]
        pixels = torch.empty(1, 3, height, width, dtype=torch.bfloat16)
        return model.encode(pixels).latent_dist.mode()

    return traced_peak_bytes(lambda: AutoencoderKL.from_config(config).eval(), run)


@functools.cache
def _text_encoder_bytes(t5_json: str, clip_json: str) -> int:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = T5Config.from_dict({**json.loads(t5_json), "num_layers": 1})
    clip = CLIPTextConfig.from_dict({**json.loads(clip_json), "num_hidden_layers": 1})

    def measure(model_cls: type[torch.nn.Module], config: object, tokens: int) -> int:
        return traced_peak_bytes(
            lambda: model_cls(config).eval(), lambda m: m(torch.zeros(1, tokens, dtype=torch.long))[0]
        )

    # The pipeline keeps CLIP's pooled output while T5 runs: both are tiny next to T5's temporaries.
    return max(measure(T5EncoderModel, t5, T5_TOKENS), measure(CLIPTextModel, clip, CLIP_TOKENS))


def translator_bytes(sizes: ArchitectureSizes, shape: JobShape, new_tokens: int) -> int:
    """Peak activation bytes of one translation (Qwen2.5-VL prefill, then greedy decoding).

    Counted from the transformers code, per vision patch P and per text position S, in bf16 except
    where it says fp32; the larger of the vision tower's and the language model's phase:
    - vision tower: the processor's fp32 pixels and their bf16 copy, the residual stream and its
      window-permuted copy, the fp32 rotary cos/sin, and one block's temporaries, whichever phase is
      larger: attention (norm, qkv, fp32 q/k after RoPE, output, projection) or MLP (norm, gate, up,
      activation, product, down);
    - language model: the input embeddings and residual stream, one decoder layer's temporaries
      (its MLP phase dominates) and the KV cache for the prompt plus the whole answer budget.
    """
    if not sizes.vlm_text:
        return 0
    v, t = sizes.vlm_vision, sizes.vlm_text
    bf16, fp32 = 2, 4
    patch_in = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    head_dim = v["hidden_size"] // v["num_heads"]
    hv, iv = v["hidden_size"], v["intermediate_size"]
    block = max(
        bf16 * hv * 2 + bf16 * 3 * hv + fp32 * 2 * hv,  # attention phase
        bf16 * hv * 2 + bf16 * iv * 4,  # MLP phase
    )
    per_patch = fp32 * patch_in + bf16 * patch_in + 2 * bf16 * hv + 2 * fp32 * head_dim + block
    patches = shape.images * shape.vision_patches
    vision = patches * per_patch
    merged = patches // v["spatial_merge_size"] ** 2
    seq = merged + TRANSLATOR_TEXT_TOKENS
    h, i = t["hidden_size"], t["intermediate_size"]
    kv_per_token = (
        t["num_hidden_layers"] * 2 * t["num_key_value_heads"] * (h // t["num_attention_heads"]) * bf16
    )
    layer = bf16 * (2 * h + 4 * i)
    language = seq * (2 * bf16 * h + layer) + (seq + new_tokens) * kv_per_token + fp32 * t["vocab_size"]
    vision_output = merged * bf16 * v["out_hidden_size"]
    return max(vision, vision_output + language)


def _json(config: dict[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=list
    )


def activations(sizes: ArchitectureSizes, shape: JobShape, new_tokens: int, lora: bool) -> dict[str, int]:
    """Peak activation bytes of each stage of one job of `shape`."""
    width, height = shape.input_wh
    out_w, out_h = shape.output_wh
    vae = _json(sizes.vae_config)
    lora_rank = sizes.lora_rank if lora else 0
    return {
        Stage.TRANSLATE.value: translator_bytes(sizes, shape, new_tokens),
        Stage.ENCODE_PROMPT.value: _text_encoder_bytes(_json(sizes.t5_config), _json(sizes.clip_config)),
        Stage.ENCODE_IMAGES.value: _vae_bytes(vae, width, height, False) if shape.images else 0,
        Stage.DENOISE.value: _denoise_bytes(
            _json(sizes.transformer_config), lora_rank, sizes.lora_targets, shape.image_tokens
        ),
        Stage.DECODE.value: _vae_bytes(vae, out_w, out_h, True),
    }


def mixing_activations(sizes: ArchitectureSizes, shape: JobShape, batched: bool) -> dict[str, int]:
    """The stages of a Feature Mixing job that differ from a generation of `shape` (0 input images).

    No translation; the first prompt's embeddings wait while the second is encoded; the denoise
    step of both branches (`_mixing_denoise_bytes`). Each image is decoded on its own: as one.
    """
    t5_width = sizes.transformer_config["joint_attention_dim"]
    first_prompt = 2 * (T5_TOKENS * t5_width + sizes.transformer_config["pooled_projection_dim"])
    text = _text_encoder_bytes(_json(sizes.t5_config), _json(sizes.clip_config))
    return {
        Stage.TRANSLATE.value: 0,
        Stage.ENCODE_PROMPT.value: text + first_prompt,
        Stage.DENOISE.value: _mixing_denoise_bytes(
            _json(sizes.transformer_config), shape.output_tokens, batched
        ),
    }


# The plan ---------------------------------------------------------------------------------------------
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
    """A predicted job peak: components, activations, per-stage and per-device totals (bytes)."""

    mode: str
    images: int
    size: int
    device: str
    translator_device: str | None
    components: dict[str, ComponentPlan]
    activations: dict[str, int]
    stages: dict[str, dict[str, int]]
    devices: dict[str, int]
    peak_bytes: int
    peak_device: str
    peak_stage: str
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
            f"{self.images} input image(s) at {self.size}x{self.size}; pipeline on {self.device}"
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
) -> MemoryPlan:
    """Predict the GPU peak of a job of `images` inputs at `size` in `mode`, without loading weights.

    `translator_device` is where the translator runs ("auto": the pipeline's device; None: no
    translator). `new_tokens` is its answer budget (default: the engine's default). `sizes` defaults
    to the published release's architectures. `feature_mixing`: a Feature Mixing pair instead (no
    input image, no translation; `mixing_batched`: its batch-2 form).
    """
    from models.translator import DEFAULT_MAX_NEW_TOKENS

    if images < 0:
        raise ValueError(f"images must be 0 or more, got {images}")
    if feature_mixing and images:
        raise ValueError(f"a Feature Mixing job takes no input image, got images={images}")
    if size < 64 or size % 16:
        raise ValueError(f"size must be a multiple of 16 of at least 64, got {size}")
    mode = MemoryMode(mode)
    sizes = sizes or published_sizes()
    new_tokens = DEFAULT_MAX_NEW_TOKENS if new_tokens is None else new_tokens
    if translator_device == "auto":
        translator_device = device
    shape = job_shape(images, size, sizes.vlm_pixels)
    act = activations(sizes, shape, new_tokens if translator_device else 0, lora=images > 0)
    if translator_device is None:
        act[Stage.TRANSLATE.value] = 0
    if feature_mixing:
        act.update(mixing_activations(sizes, shape, mixing_batched))

    components = plan_components(mode, sizes, device, translator_device)
    stages = stage_totals(mode, sizes, components, act, device, translator_device)
    devices: dict[str, int] = {}
    for per_device in stages.values():
        for d, n in per_device.items():
            devices[d] = max(devices.get(d, 0), n)
    peak_bytes, peak_device, peak_stage = max(
        ((n, d, stage) for stage, per_device in stages.items() for d, n in per_device.items()),
        default=(0, str(device), Stage.DENOISE.value),
    )
    notes = []
    if sizes.lora_rank_assumed:
        notes.append(
            f"LoRA sizes assume rank {sizes.lora_rank_assumed} (the release does not state it); "
            "with the adapter files local, their headers are read instead."
        )
    if is_cpu(device):
        notes.append("the pipeline runs on the CPU: nothing is planned on a GPU.")
    if feature_mixing:
        form = "one batch-2 pass" if mixing_batched else "two batch-1 passes, the source's keys kept"
        notes.append(f"a Feature Mixing pair: every layer mixing, {form} per step; no translation.")
    return MemoryPlan(
        mode=mode.value,
        images=images,
        size=size,
        device=str(device),
        translator_device=str(translator_device) if translator_device else None,
        components=components,
        activations=act,
        stages=stages,
        devices=devices,
        peak_bytes=peak_bytes,
        peak_device=peak_device,
        peak_stage=peak_stage,
        lora_rank_assumed=sizes.lora_rank_assumed,
        notes=notes,
    )


def plan_components(
    mode: MemoryMode, sizes: ArchitectureSizes, device: str, translator_device: str | None
) -> dict[str, ComponentPlan]:
    """Each component's bytes as stored in `mode`, its device, and how it uses that device."""
    spec = MODES[mode]
    bf16 = "bfloat16"
    transformer_bytes = (
        sizes.transformer_fp8_bytes if spec.fp8_transformer else sizes.bytes_bf16["transformer"]
    )
    transformer_dtype = "float8_e4m3fn + bfloat16" if spec.fp8_transformer else bf16
    tr, tg = spec.transformer.value, Group.TRANSFORMER.value
    te, teg = spec.text_encoders.value, Group.TEXT_ENCODERS.value
    components = {
        "transformer": ComponentPlan(transformer_bytes, transformer_dtype, device, tr, tg),
        "edit_lora": ComponentPlan(sizes.lora_numel["edit_lora"] * 2, bf16, device, tr, tg),
        "gen_lora": ComponentPlan(sizes.lora_numel["gen_lora"] * 2, bf16, device, tr, tg),
        "t5_xxl": ComponentPlan(sizes.bytes_bf16["t5_xxl"], bf16, device, te, teg),
        "clip_l": ComponentPlan(sizes.bytes_bf16["clip_l"], bf16, device, te, teg),
        "vae": ComponentPlan(sizes.bytes_bf16["vae"], bf16, device, Residency.RESIDENT.value, None),
    }
    if translator_device is not None:
        residency = translator_residency(mode, device, translator_device)
        components["translator"] = ComponentPlan(
            sizes.bytes_bf16["translator"],
            bf16,
            str(translator_device),
            residency.value,
            Group.TRANSLATOR.value,
        )
    return components


def stage_totals(
    mode: MemoryMode,
    sizes: ArchitectureSizes,
    components: dict[str, ComponentPlan],
    act: dict[str, int],
    device: str,
    translator_device: str | None,
) -> dict[str, dict[str, int]]:
    """Bytes on each GPU during each stage: the weights present then, plus the stage's activations."""
    # Layerwise casting upcasts one layer at a time to compute with it: a transient of its own.
    cast = sizes.largest_cast_layer_bytes if MODES[mode].fp8_transformer else 0
    stages: dict[str, dict[str, int]] = {}
    for stage in Stage:
        per_device: dict[str, int] = {}
        for comp in components.values():
            weight = comp.bytes_in(stage, sizes.stream_window_bytes)
            if weight and not is_cpu(comp.device):
                per_device[comp.device] = per_device.get(comp.device, 0) + weight
        stage_device = translator_device if stage is Stage.TRANSLATE else device
        if stage_device is not None and not is_cpu(stage_device):
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


@dataclass(frozen=True)
class MixingCost:
    """A Feature Mixing pair against one generation of the same size: bytes and FLOPs."""

    size: int
    mode: str
    batched: bool
    noise_tokens: int
    denoise_bytes: int  # one generation's denoise activations
    mixing_denoise_bytes: int
    kept_kv_bytes: int  # of which the source's kept keys and values (sequential form)
    peak_bytes: int  # one generation's job peak in `mode`
    mixing_peak_bytes: int
    flops_per_step: int  # one generation
    mixing_flops_per_step: int

    @property
    def flops_ratio(self) -> float:
        return self.mixing_flops_per_step / self.flops_per_step

    @property
    def denoise_ratio(self) -> float:
        return self.mixing_denoise_bytes / self.denoise_bytes

    @property
    def peak_ratio(self) -> float:
        return self.mixing_peak_bytes / self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "flops_ratio": self.flops_ratio,
            "denoise_ratio": self.denoise_ratio,
            "peak_ratio": self.peak_ratio,
        }

    def format(self) -> str:
        form = "batch-2 form" if self.batched else "sequential form"
        flops, now = self.mixing_flops_per_step / 1e12, self.flops_per_step / 1e12
        act, one, kept = self.mixing_denoise_bytes / GiB, self.denoise_bytes / GiB, self.kept_kv_bytes / GiB
        peak, base = self.mixing_peak_bytes / GiB, self.peak_bytes / GiB
        return "\n".join(
            [
                f"Feature Mixing pair vs one generation at {self.size}x{self.size} "
                f"({form}, every layer mixing):",
                f"  transformer FLOPs per step: {flops:.1f} vs {now:.1f} TFLOP ({self.flops_ratio:.2f}x)",
                f"  denoise activations: {act:.2f} vs {one:.2f} GiB ({self.denoise_ratio:.1f}x; "
                f"of which kept source keys and values {kept:.2f} GiB)",
                f"  job peak in {self.mode}: {peak:.2f} vs {base:.2f} GiB ({self.peak_ratio:.3f}x)",
            ]
        )


def mixing_cost(
    mode: MemoryMode | str = "resident", size: int = 1024, *, batched: bool = False, **plan_kwargs: Any
) -> MixingCost:
    """What a Feature Mixing pair costs against one text-to-image generation of `size` in `mode`.

    `plan_kwargs` go to `plan_memory` (device, translator_device, sizes, ...).
    """
    sizes = plan_kwargs.pop("sizes", None) or published_sizes()
    one = plan_memory(mode, 0, size, sizes=sizes, **plan_kwargs)
    pair = plan_memory(mode, 0, size, sizes=sizes, feature_mixing=True, mixing_batched=batched, **plan_kwargs)
    shape = job_shape(0, size, sizes.vlm_pixels)
    tokens = shape.output_tokens
    config = sizes.transformer_config
    one_pass = transformer_flops(config, T5_TOKENS, tokens)
    return MixingCost(
        size=size,
        mode=MemoryMode(mode).value,
        batched=batched,
        noise_tokens=tokens,
        denoise_bytes=one.activations[Stage.DENOISE.value],
        mixing_denoise_bytes=pair.activations[Stage.DENOISE.value],
        kept_kv_bytes=0 if batched else kept_kv_bytes(config, tokens),
        peak_bytes=one.peak_bytes,
        mixing_peak_bytes=pair.peak_bytes,
        flops_per_step=one_pass,
        mixing_flops_per_step=one_pass + transformer_flops(config, T5_TOKENS, tokens, extra_keys=tokens),
    )


# Fitting a card ----------------------------------------------------------------------------------------
def fits(plan: MemoryPlan, free: dict[str, int]) -> bool:
    """Whether every device's predicted peak, with `FIT_HEADROOM`, fits its free bytes."""
    for d, need in plan.devices.items():
        have = next((n for k, n in free.items() if same_device(k, d)), None)
        if have is not None and need * (1 + FIT_HEADROOM) > have:
            return False
    return True


def max_images_that_fit(mode: MemoryMode, free: dict[str, int], limit: int, **plan_kwargs: Any) -> int | None:
    """The most input images (0..limit) a job may have in `mode` and still fit; None if none does."""
    best = None
    for images in range(limit + 1):
        if not fits(plan_memory(mode, images, **plan_kwargs), free):
            break
        best = images
    return best


class MemoryPlanError(RuntimeError):
    """The configured memory mode cannot fit the GPU; the message names what would."""


def check_fit(mode: MemoryMode, images: int, free: dict[str, int], **plan_kwargs: Any) -> MemoryPlan:
    """Return the plan if it fits `free` (device -> bytes); raise `MemoryPlanError` naming a fit."""
    plan = plan_memory(mode, images, **plan_kwargs)
    if fits(plan, free):
        return plan
    size = plan_kwargs.get("size", 1024)
    short = [
        f"{d} needs {need / GiB:.1f} GiB (+{FIT_HEADROOM:.0%} headroom) but has {free[k] / GiB:.1f} GiB free"
        for d, need in plan.devices.items()
        for k in free
        if same_device(k, d) and need * (1 + FIT_HEADROOM) > free[k]
    ]
    message = (
        f"DREAMOMNI2_MEMORY={mode.value} does not fit: with {images} input image(s) at {size}x{size}, "
        + "; ".join(short)
        + "."
    )
    options = []
    for other in MemoryMode:
        if other is mode:
            continue
        other_plan = plan_memory(other, images, **plan_kwargs)
        if fits(other_plan, free):
            options.append(
                f"DREAMOMNI2_MEMORY={other.value} fits (predicted {other_plan.peak_bytes / GiB:.1f} GiB)"
            )
            break
    if images:
        fewer = max_images_that_fit(mode, free, images - 1, **plan_kwargs)
        if fewer is not None:
            options.append(f"{mode.value} fits with DREAMOMNI2_MAX_IMAGES={fewer}")
    if not options:
        options.append(
            "no mode fits this GPU at this image limit; put the translator on another device "
            "(DREAMOMNI2_TRANSLATOR_DEVICE=cuda:1 or cpu) or lower DREAMOMNI2_MAX_IMAGES"
        )
    raise MemoryPlanError(
        message
        + " "
        + "; ".join(options)
        + ". See `python -m models plan`; DREAMOMNI2_MEMORY_CHECK=false starts anyway."
    )
