"""Activation tracing: the bytes each stage of a job allocates, found without memory or compute.

The real diffusers / transformers forward code runs on fake tensors (no memory, no compute) while
every tensor it creates is counted: one double and one single block of the transformer (blocks free
their temporaries before the next starts), the VAE and both text encoders; the translator
(Qwen2.5-VL, whose forward needs real values) from a formula over its config. Everything is traced
in the dtype the models are stored in (`ArchitectureSizes.dtype`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models.memory.sizes import CLIP_TOKENS, T5_TOKENS, TRANSLATOR_TEXT_TOKENS, ArchitectureSizes
from models.modes import Stage

if TYPE_CHECKING:
    from api_schemas.jobs import JobLimits


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


def traced_peak_bytes(
    build: Callable[[], torch.nn.Module],
    run: Callable[[torch.nn.Module], Any],
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Peak bytes of the tensors `run(model)` creates, on fake tensors: no memory used, no compute done.

    `build` makes the model (on the meta device, in `dtype` unless it says otherwise); its weights become
    fake tensors of the same shapes and dtypes. Inputs should be made inside `run`, so that they
    count; so does the output while it is alive.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from models.architectures import building_on

    with building_on("meta", dtype):
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

    from models.buckets import KONTEXT_BUCKETS, output_size, scale_buckets

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
def _denoise_bytes(
    config_json: str, lora_rank: int, lora_targets: tuple[str, ...], tokens: int, dtype: str, batch: int = 1
) -> int:
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
        dt = getattr(torch, dtype)
        return model(
            hidden_states=torch.empty(batch, tokens, config["in_channels"], dtype=dt),
            encoder_hidden_states=torch.empty(batch, T5_TOKENS, text_dim, dtype=dt),
            pooled_projections=torch.empty(batch, config["pooled_projection_dim"], dtype=dt),
            timestep=torch.ones(batch, dtype=dt),
            guidance=torch.ones(batch),
            img_ids=torch.zeros(tokens, 3, dtype=dt),
            txt_ids=torch.zeros(T5_TOKENS, 3, dtype=dt),
            return_dict=False,
        )

    return traced_peak_bytes(build, run, getattr(torch, dtype))


@functools.cache
def _mixing_denoise_bytes(config_json: str, tokens: int, batched: bool, dtype: str) -> int:
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
        dt = getattr(torch, dtype)

        def call(batch: int) -> torch.Tensor:
            return model(
                hidden_states=torch.empty(batch, tokens, config["in_channels"], dtype=dt),
                encoder_hidden_states=torch.empty(batch, T5_TOKENS, config["joint_attention_dim"], dtype=dt),
                pooled_projections=torch.empty(batch, config["pooled_projection_dim"], dtype=dt),
                timestep=torch.ones(batch, dtype=dt),
                guidance=torch.ones(batch),
                img_ids=torch.zeros(tokens, 3, dtype=dt),
                txt_ids=torch.zeros(T5_TOKENS, 3, dtype=dt),
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

    torch_dtype = getattr(torch, dtype)
    peak = traced_peak_bytes(lambda: FluxTransformer2DModel.from_config(config).eval(), run, torch_dtype)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    return peak + (0 if batched else (layers - 2) * kept_kv_bytes(config, tokens, 1, itemsize))


def kept_kv_bytes(
    transformer_config: dict[str, Any], tokens: int, layers: int | None = None, itemsize: int = 2
) -> int:
    """Bytes of the source's noise keys and values the sequential form keeps for `layers` layers
    (default: every layer of the transformer) between the source pass and the target pass, stored
    in a dtype of `itemsize` bytes (bf16 by default)."""
    if layers is None:
        layers = transformer_config["num_layers"] + transformer_config["num_single_layers"]
    inner = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    return layers * 2 * tokens * inner * itemsize


@functools.cache
def _vae_bytes(config_json: str, width: int, height: int, decode: bool, dtype: str) -> int:
    from diffusers import AutoencoderKL

    config = json.loads(config_json)
    torch_dtype = getattr(torch, dtype)

    def run(model: torch.nn.Module) -> object:
        if decode:
            latents = torch.empty(1, config["latent_channels"], height // 8, width // 8, dtype=torch_dtype)
            return model.decode(latents, return_dict=False)[0]
        pixels = torch.empty(1, 3, height, width, dtype=torch_dtype)
        return model.encode(pixels).latent_dist.mode()

    return traced_peak_bytes(lambda: AutoencoderKL.from_config(config).eval(), run, torch_dtype)


@functools.cache
def _text_encoder_bytes(t5_json: str, clip_json: str, dtype: str) -> int:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = T5Config.from_dict({**json.loads(t5_json), "num_layers": 1})
    clip = CLIPTextConfig.from_dict({**json.loads(clip_json), "num_hidden_layers": 1})

    def measure(model_cls: type[torch.nn.Module], config: object, tokens: int) -> int:
        return traced_peak_bytes(
            lambda: model_cls(config).eval(),
            lambda m: m(torch.zeros(1, tokens, dtype=torch.long))[0],
            getattr(torch, dtype),
        )

    # The pipeline keeps CLIP's pooled output while T5 runs: both are tiny next to T5's temporaries.
    return max(measure(T5EncoderModel, t5, T5_TOKENS), measure(CLIPTextModel, clip, CLIP_TOKENS))


def translator_bytes(sizes: ArchitectureSizes, shape: JobShape, new_tokens: int) -> int:
    """Peak activation bytes of one translation (Qwen2.5-VL prefill, then greedy decoding).

    Counted from the transformers code, per vision patch P and per text position S, in the models'
    dtype (`bf16` below) except where it says fp32; the larger of the vision tower's and the language
    model's phase:
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
    bf16, fp32 = sizes.itemsize, 4
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


def text_job_bytes(sizes: ArchitectureSizes, shape: JobShape, limits: JobLimits) -> int:
    """Peak activation bytes of the worst text job `limits` admit (`models.text_jobs`): a judge of
    DREAMOMNI2_MAX_IMAGES + 1 images, each seen at `JUDGE_MAX_PIXELS` at most, with the budget of
    the longest judge answer; or DREAMOMNI2_MAX_MIXING_PROMPTS pairs of
    DREAMOMNI2_MIXING_PROMPT_MAX_CHARS, with no image, whose answer budget grows with both."""
    from api_schemas.common import Task
    from api_schemas.text_tasks import judge_answer_schema, mixing_prompts_schema
    from models.structured import max_answer_bytes
    from models.text_jobs import JUDGE_MAX_PIXELS

    patch, merge = 14, 2
    # The processor rounds each side up to whole merged patches.
    side = int(JUDGE_MAX_PIXELS**0.5) // (patch * merge) * (patch * merge) + patch * merge
    judge = dataclasses.replace(
        shape, images=limits.max_images_for(Task.JUDGE), vision_patches=(side // patch) ** 2
    )
    pairs = dataclasses.replace(shape, images=0)
    pairs_schema = mixing_prompts_schema(limits.max_mixing_prompts, limits.mixing_prompt_max_chars)
    return max(
        translator_bytes(sizes, judge, max_answer_bytes(judge_answer_schema()) + 1),
        translator_bytes(sizes, pairs, max_answer_bytes(pairs_schema) + 1),
    )


def _json(config: dict[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=list
    )


def prompt_bytes(sizes: ArchitectureSizes) -> int:
    """Bytes of one prompt's embeddings (T5's sequence and CLIP's pooled vector): they stay alive from
    the encoding through the decode."""
    config = sizes.transformer_config
    return sizes.itemsize * (T5_TOKENS * config["joint_attention_dim"] + config["pooled_projection_dim"])


def activations(
    sizes: ArchitectureSizes, shape: JobShape, new_tokens: int, lora: bool, batch: int = 1
) -> dict[str, int]:
    """Peak activation bytes of each stage of one job of `shape` (the prompt's embeddings, made in
    encode_prompt, counted in the stages after it: denoising's trace takes them as its input).

    `batch`: output images sampled together. The prompt's embeddings are then repeated once per image
    (next to the one encoded), each input image is still encoded once (its latents repeated), the
    transformer steps `batch` rows at a time, and the images are decoded one at a time.
    """
    width, height = shape.input_wh
    out_w, out_h = shape.output_wh
    vae, dtype = _json(sizes.vae_config), sizes.dtype
    lora_rank = sizes.lora_rank if lora else 0
    prompt = prompt_bytes(sizes) * (1 if batch == 1 else 1 + batch)
    return {
        Stage.TRANSLATE.value: translator_bytes(sizes, shape, new_tokens),
        Stage.ENCODE_PROMPT.value: _text_encoder_bytes(
            _json(sizes.t5_config), _json(sizes.clip_config), dtype
        ),
        Stage.ENCODE_IMAGES.value: prompt
        + (_vae_bytes(vae, width, height, False, dtype) if shape.images else 0),
        Stage.DENOISE.value: _denoise_bytes(
            _json(sizes.transformer_config), lora_rank, sizes.lora_targets, shape.image_tokens, dtype, batch
        ),
        Stage.DECODE.value: prompt + _vae_bytes(vae, out_w, out_h, True, dtype),
    }


def mixing_activations(sizes: ArchitectureSizes, shape: JobShape, batched: bool) -> dict[str, int]:
    """The stages of a Feature Mixing job that differ from a generation of `shape` (0 input images).

    No translation; the first prompt's embeddings wait while the second is encoded, and both live on
    to the decode; the denoise step of both branches (`_mixing_denoise_bytes`, whose trace takes one
    prompt per branch). Each image is decoded on its own: as one.
    """
    prompt = prompt_bytes(sizes)
    text = _text_encoder_bytes(_json(sizes.t5_config), _json(sizes.clip_config), sizes.dtype)
    vae, (out_w, out_h) = _json(sizes.vae_config), shape.output_wh
    return {
        Stage.TRANSLATE.value: 0,
        Stage.ENCODE_PROMPT.value: text + prompt,
        Stage.ENCODE_IMAGES.value: 2 * prompt,
        Stage.DENOISE.value: _mixing_denoise_bytes(
            _json(sizes.transformer_config), shape.output_tokens, batched, sizes.dtype
        ),
        Stage.DECODE.value: 2 * prompt + _vae_bytes(vae, out_w, out_h, True, sizes.dtype),
    }
